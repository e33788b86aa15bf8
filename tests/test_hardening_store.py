"""Checkpoint stores shared by writers, and uploads slower than the collectives.

Pruning never deletes another writer's checkpoint in progress (a directory without meta.json)
until it is stale, in the local directory store and in the MLflow store on a file: artifact
URI. A checkpoint upload slower than ``backend.timeout_s`` runs in the background on rank 0
without making the other rank's collectives time out; a crash mid-upload leaves the previous
checkpoint the newest, and resume finds it (real rank loop, 2 gloo ranks).
"""

from __future__ import annotations

import os
import time
import traceback

from mlflow.tracking import MlflowClient

from sparkml_dist.config import JobConfig
from sparkml_dist.tracking.mlflow_store import MlflowCheckpointStore
from sparkml_dist.training.checkpoint import (
    META_FILE, SHARED_PART, CheckpointMeta, dir_name, part_file, prune_choice, store_part)
from sparkml_dist.training.local_store import DirectoryCheckpointStore
from tests.conftest import sqlite_store
from tests.ranks import Dataset, digits, rank_stores, spawn_ranks


def commit(store, steps: int, state: dict | None = None) -> str:
    name = dir_name(steps)
    parts = {SHARED_PART: store_part(store, name, SHARED_PART,
                                     {"steps": steps} if state is None else state)}
    store.commit(name, CheckpointMeta(steps_done=steps, epoch=0, step_in_epoch=steps, parts=parts))
    return name


def in_progress(store, steps: int) -> str:
    """Another writer's upload cut at its first part: no meta.json yet."""
    name = dir_name(steps)
    store_part(store, name, part_file(1), {"residual": steps})
    return name


def test_prune_choice_keeps_newer_uncommitted_and_young_dirs():
    dirs = [dir_name(s) for s in (5, 10, 15, 20, 25)]
    committed = {dir_name(s) for s in (10, 15, 20)}
    ages = {dir_name(5): 10.0, dir_name(25): 1e9}
    chosen = prune_choice(dirs, committed, dir_name(20), 1, lambda n: ages[n], stale_s=60.0)
    assert chosen == [dir_name(15), dir_name(10)]  # ckpt-5 is young, ckpt-25 is newer
    ages[dir_name(5)] = 61.0
    assert dir_name(5) in prune_choice(dirs, committed, dir_name(20), 1, lambda n: ages[n], 60.0)
    assert dir_name(25) not in prune_choice(dirs, committed, dir_name(20), 1, lambda n: 1e9, 60.0)


def test_directory_store_prune_leaves_another_writers_upload_until_stale(tmp_path):
    a = DirectoryCheckpointStore(tmp_path, keep_last=1, stale_s=600.0)
    b = DirectoryCheckpointStore(tmp_path, keep_last=1, stale_s=600.0)
    theirs = in_progress(b, 5)
    newer = in_progress(b, 40)
    for steps in (10, 15, 20):
        commit(a, steps)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [theirs, dir_name(20), newer]  # committed 10 and 15 pruned
    old = time.time() - 601
    for d in (tmp_path / theirs, tmp_path / newer):
        for p in [d, *d.iterdir()]:
            os.utime(p, (old, old))
    commit(a, 25)
    assert sorted(p.name for p in tmp_path.iterdir()) == [dir_name(25), newer]


def test_mlflow_store_prune_leaves_another_writers_upload_until_stale(tmp_path):
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("prune", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    a = MlflowCheckpointStore(uri, run_id, keep_last=1, stale_s=1.5)
    b = MlflowCheckpointStore(uri, run_id, keep_last=1)
    theirs = in_progress(b, 5)
    for steps in (10, 15):
        commit(a, steps)
    root = tmp_path / "art" / run_id / "artifacts" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [theirs, dir_name(15)]
    assert (root / theirs / part_file(1)).exists()
    assert a.complete_names() == [dir_name(15)]
    time.sleep(1.6)  # uncommitted for longer than stale_s since a first listed it: a cut write
    commit(a, 20)
    assert sorted(p.name for p in root.iterdir()) == [dir_name(20)]


class SlowStore(DirectoryCheckpointStore):
    """A real directory store whose shared-part writes (rank 0's upload) take ``delay_s``; with
    ``die_at`` the process exits hard in the middle of that checkpoint's upload."""

    def __init__(self, root, keep_last, delay_s, die_at=None, upload_timeout_s=900.0):
        super().__init__(root, keep_last, upload_timeout_s=upload_timeout_s)
        self.delay_s, self.die_at = delay_s, die_at

    def write_part(self, name: str, filename: str, data: bytes) -> None:
        if filename == SHARED_PART:
            if name == self.die_at:
                super().write_part(name, filename, data)
                os._exit(23)  # after a part, before meta.json
            time.sleep(self.delay_s)
        super().write_part(name, filename, data)


def _rank_main(rank, world, port, cfg, ds, ckpt_dir, attempt, store_args, out):
    """One rank of :func:`run_two`: rank 0's checkpoint store takes ``store_args``, the other's
    stores without delay."""
    import datetime

    import torch
    import torch.distributed as dist

    from sparkml_dist.comm.base import Endpoint
    from sparkml_dist.comm.factory import create_communicator
    from sparkml_dist.training.loop import NullSink, RankPlan, train_rank

    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0,
                              timeout=datetime.timedelta(seconds=cfg.backend.timeout_s))
        ep = Endpoint(rank=rank, world_size=world, host="127.0.0.1", port=port, attempt=attempt,
                      timeout_s=cfg.backend.timeout_s)
        comm = create_communicator(cfg.backend, ep, store, torch.device("cpu"))
        train, val = rank_stores(ds, rank, world)
        plan = RankPlan(in_features=ds.x.shape[1], num_outputs=int(ds.y.max()) + 1,
                        train_shard_sizes=ds.shard_sizes(world), attempt=attempt)
        ckpt = SlowStore(ckpt_dir, cfg.checkpoint.keep_last,
                         **(store_args if rank == 0 else {"delay_s": 0.0}))
        t0 = time.monotonic()
        try:
            result = train_rank(cfg, plan, comm, train, val, torch.device("cpu"), NullSink(),
                                ckpt)
        finally:
            comm.close()
        out.put((rank, "ok", {"resumed_from": result.resumed_from, "steps": result.steps_done,
                              "wall_s": time.monotonic() - t0}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        out.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def run_two(cfg, ds, ckpt_dir, store_args, attempt=0, timeout_s=240.0):
    """Both ranks of one attempt, rank 0 with ``store_args``; ``{rank: (status, payload)}``
    (status ok, error, or died with the exit code)."""
    return spawn_ranks(_rank_main, 2, (cfg, ds, ckpt_dir, attempt, store_args), timeout_s)


def job(epochs: int, timeout_s: float = 3.0) -> JobConfig:
    # 160 training rows, batch 16 per rank: 5 steps an epoch, a checkpoint every 2 steps.
    return JobConfig().replace(**{
        "model.kwargs": {"hidden": [8]}, "optimizer.name": "sgd", "optimizer.lr": 0.05,
        "training.num_workers": 2, "training.batch_size": 16, "training.epochs": epochs,
        "training.seed": 3, "training.log_every_steps": 1, "backend.timeout_s": timeout_s,
        "checkpoint.every_steps": 2, "checkpoint.keep_last": 10})


def data() -> Dataset:
    return digits(200)


def test_an_upload_slower_than_the_collective_timeout_does_not_time_peers_out(tmp_path):
    cfg = job(1, timeout_s=3.0)
    results = run_two(cfg, data(), str(tmp_path), {"delay_s": 4.0})  # > backend.timeout_s
    assert {s for s, _ in results.values()} == {"ok"}, results
    # Three checkpoints (steps 2, 4, 5), each upload 4 s on rank 0's background thread.
    assert results[0][1]["wall_s"] >= 3 * 4.0
    store = DirectoryCheckpointStore(tmp_path)
    assert store.complete_names() == [dir_name(5), dir_name(4), dir_name(2)]
    resumed = run_two(job(2), data(), str(tmp_path), {"delay_s": 0.0}, attempt=1)
    assert {s for s, _ in resumed.values()} == {"ok"}, resumed
    assert [p["resumed_from"] for _, p in resumed.values()] == [5, 5]


def test_a_crash_mid_upload_leaves_the_previous_checkpoint_the_newest(tmp_path):
    cfg = job(1, timeout_s=10.0)
    results = run_two(cfg, data(), str(tmp_path), {"delay_s": 0.0, "die_at": dir_name(4)})
    assert results[0] == ("died", 23), results
    store = DirectoryCheckpointStore(tmp_path)
    assert (tmp_path / dir_name(4) / SHARED_PART).exists()
    assert not (tmp_path / dir_name(4) / META_FILE).exists()
    assert store.complete_names()[0] == dir_name(2)
    resumed = run_two(cfg, data(), str(tmp_path), {"delay_s": 0.0}, attempt=1)
    assert {s for s, _ in resumed.values()} == {"ok"}, resumed
    assert [p["resumed_from"] for _, p in resumed.values()] == [2, 2]
    assert store.complete_names()[0] == dir_name(5)


def test_an_upload_past_the_stores_bound_fails_every_rank_clearly(tmp_path):
    cfg = job(1, timeout_s=5.0)
    results = run_two(cfg, data(), str(tmp_path), {"delay_s": 20.0, "upload_timeout_s": 1.0})
    assert {s for s, _ in results.values()} == {"error"}, results
    for _, text in results.values():
        assert f"CheckpointError: checkpoint {dir_name(2)} is still being stored by rank(s) 0" \
            in text
        assert "upload_timeout_s" in text
    assert DirectoryCheckpointStore(tmp_path).complete_names() == []


def test_the_best_model_is_stored_in_the_background_too(tmp_path):
    from sparkml_dist.training.checkpoint import BEST_NAME

    # Every epoch improves at first; each best-model write takes 4 s > backend.timeout_s.
    cfg = job(2, timeout_s=3.0).replace(**{
        "checkpoint.every_steps": 0,
        "training.early_stopping": {"metric": "val/loss", "patience": 5, "keep_best": True}})
    results = run_two(cfg, data(), str(tmp_path), {"delay_s": 4.0})
    assert {s for s, _ in results.values()} == {"ok"}, results
    best = tmp_path / BEST_NAME
    assert (best / SHARED_PART).exists() and (best / META_FILE).exists()
    assert DirectoryCheckpointStore(tmp_path).complete_names() == [dir_name(10), dir_name(5)]


def _run_with_checkpoints(tmp_path, steps: tuple[int, ...]):
    uri = sqlite_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("final", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    store = MlflowCheckpointStore(uri, run_id, keep_last=5)
    for s in steps:
        commit(store, s, {"model": {"steps": s}})
    return uri, run_id


def test_final_state_reads_the_reported_last_checkpoint_without_listing(tmp_path, monkeypatch):
    from sparkml_dist.api import final_state

    uri, run_id = _run_with_checkpoints(tmp_path, (10, 20))
    listed = []
    real = MlflowClient.list_artifacts
    monkeypatch.setattr(MlflowClient, "list_artifacts",
                        lambda self, *a, **k: listed.append(a) or real(self, *a, **k))
    assert final_state(run_id, uri, steps_done=20) == {"steps": 20}
    assert listed == []  # read by name
    assert final_state(run_id, uri) == {"steps": 20}  # without the hint: the newest, by listing
    assert listed


def test_final_state_falls_back_to_the_newest_loadable_when_the_named_one_is_missing(tmp_path):
    from sparkml_dist.api import final_state

    uri, run_id = _run_with_checkpoints(tmp_path, (10, 20))
    # No checkpoint at 30 (a strategy whose steps count differently): the newest one is used.
    assert final_state(run_id, uri, steps_done=30) == {"steps": 20}
    (tmp_path / "art" / run_id / "artifacts" / "checkpoints" / dir_name(20) / SHARED_PART
     ).write_bytes(b"torn")  # the named one unreadable: the previous complete one
    assert final_state(run_id, uri, steps_done=20) == {"steps": 10}
