"""Model parallelism: the planning math (balanced splits against brute force, the mesh, the
ideal bubble), the driver's refusals naming the setting, then the real rank loop on gloo
processes: pipelines of 2 and 3 stages (GPipe and 1F1B), tensor parallel on 2 ranks and a
2x2 data x pipeline mesh against the single-process reference within 1e-5; a killed stage (and a
killed tensor shard) resuming bitwise; a changed mesh refused; the bubble and traffic metrics."""

import itertools

import numpy as np
import pytest
import torch

from sparkml_dist.algo.partition import (
    Mesh, PlanError, balanced_split, ideal_bubble, named_split, stage_ranges)
from sparkml_dist.config import JobConfig
from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies import check_before_launch, data_layout
from tests.ranks import digits, final_model, reference_weights, run_ranks
from tests.test_compression import _ok

TOL = 1e-5

# -- pure planning --------------------------------------------------------------------------


def _brute_force(sizes, p):
    best = None
    for cuts in itertools.combinations(range(1, len(sizes)), p - 1):
        bounds = (0, *cuts, len(sizes))
        worst = max(sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_balanced_split_minimises_the_largest_stage(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    sizes = [int(v) for v in rng.integers(0, 100, size=n)]
    for p in range(1, n + 1):
        starts = balanced_split(sizes, p)
        assert starts[0] == 0 and len(starts) == p and list(starts) == sorted(set(starts))
        ranges = stage_ranges(starts, n)
        assert [i for r in ranges for i in r] == list(range(n)) and all(len(r) for r in ranges)
        assert max(sum(sizes[i] for i in r) for r in ranges) == _brute_force(sizes, p)


def test_balanced_split_cases_and_errors():
    assert balanced_split([10, 10, 10, 10], 2) == (0, 2)
    assert balanced_split([100, 1, 1, 1, 100], 2) == (0, 2)  # {100, 1}, {1, 1, 100}: max 102
    assert balanced_split([1, 2, 3], 3) == (0, 1, 2)
    with pytest.raises(PlanError, match="4 stages need at least 4 layers; the model has 3"):
        balanced_split([1, 2, 3], 4)


def test_named_split_and_its_errors():
    names = ["input", "block0", "block1", "head"]
    assert named_split(names, ["block1"], 2) == (0, 2)
    assert named_split(names, ["block0", "head"], 3) == (0, 1, 3)
    with pytest.raises(PlanError, match=r"\['blockX'\] are not top-level layers.*input, block0"):
        named_split(names, ["blockX"], 2)
    with pytest.raises(PlanError, match="must be distinct, in model order"):
        named_split(names, ["head", "block0"], 3)
    with pytest.raises(PlanError, match="3 stages need 2 boundary"):
        named_split(names, ["head"], 3)


def test_ideal_bubble():
    assert ideal_bubble(1, 4) == 0
    assert ideal_bubble(2, 4) == pytest.approx(1 / 5)
    assert ideal_bubble(4, 8) == pytest.approx(3 / 11)
    assert ideal_bubble(4, 8, virtual=2) == pytest.approx(3 / 19)


def test_mesh_maps_ranks_and_groups():
    m = Mesh(2, 3, 1)
    assert [m.coords(r) for r in range(6)] == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0),
                                               (1, 1, 0), (1, 2, 0)]
    assert all(m.rank_of(*m.coords(r)) == r for r in range(6))
    assert m.pipeline_ranks(1, 0) == (3, 4, 5) and m.data_ranks(2, 0) == (2, 5)
    assert m.shards_of_rank() == ((0,), (), (), (1,), (), ())
    t = Mesh(2, 1, 2)
    assert t.tensor_ranks(1, 0) == (2, 3) and t.data_ranks(0, 1) == (1, 3)
    assert t.shards_of_rank() == ((0,), (), (1,), ())
    with pytest.raises(PlanError, match="mesh.pipeline must be an int >= 1"):
        Mesh(1, 0, 1)


def test_saved_tensor_meter_counts_distinct_activation_storages():
    from sparkml_dist.strategies.model_parallel.memory import SavedTensorMeter, state_bytes

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(10, 8)
    with SavedTensorMeter(net.parameters()) as meter:
        net(x).sum().backward()
    # the first linear saves its input, ReLU its output (which the second linear saves too)
    assert meter.peak == (10 * 8 + 10 * 16) * 4 and meter.current == 0
    with SavedTensorMeter(net.parameters()) as meter:
        a = net(x[:5]).sum()
        b = net(x[5:]).sum()  # both micro-batches alive: x's storage once, two ReLU outputs
        (a + b).backward()
    assert meter.peak == (10 * 8 + 2 * 5 * 16) * 4
    opt = torch.optim.Adam(net.parameters())
    opt.step()
    n = sum(p.numel() for p in net.parameters())
    assert state_bytes(net.parameters(), opt) == n * 4 * 4 + 4 * 4  # p, grad, 2 moments, steps


def test_default_tensor_plan_pairs_linear_layers_with_only_elementwise_ones_between():
    from sparkml_dist.models import deep_mlp, mlp
    from sparkml_dist.strategies.model_parallel.tensor import default_plan

    assert default_plan(mlp(64, 10, hidden=[32, 16])) == {"0": "colwise", "2": "rowwise"}
    assert default_plan(mlp(64, 10, hidden=[32, 16, 8], dropout=0.1)) == {
        "0": "colwise", "3": "rowwise", "6": "colwise", "9": "rowwise"}
    # layer norms and residual blocks would see a slice of the activations: nothing is paired
    assert default_plan(deep_mlp(64, 10)) == {}


# -- the driver refuses what cannot run ------------------------------------------------------


def mp_job(world: int = 2, epochs: int = 2, **extra) -> JobConfig:
    return JobConfig().replace(**{
        "model.factory": "sparkml_dist.models:deep_mlp", "model.kwargs": {"width": 32, "depth": 3},
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.momentum": 0.9,
        "optimizer.schedule": "cosine", "training.num_workers": world, "training.batch_size": 16,
        "training.epochs": epochs, "training.seed": 3, "training.log_every_steps": 5,
        "backend.timeout_s": 60.0, "checkpoint.every_steps": 0,
        "strategy.kind": "model_parallel", "strategy.pipeline_stages": world, **extra})


@pytest.mark.parametrize("overrides, expected", [
    ({"model.factory": "sparkml_dist.models:small_cnn", "model.kwargs": {}},
     r"strategy.pipeline_stages=2 needs model.factory=sparkml_dist.models:small_cnn to return "
     r"an nn.Sequential .* it returned SmallCNN"),
    ({"model.kwargs": {"width": 8, "depth": 1}, "strategy.pipeline_stages": 4,
      "training.num_workers": 4},
     r"strategy.pipeline_stages: cannot cut the model into 4 stages: the model "
     r"\(sparkml_dist.models:deep_mlp\) has 3 top-level layers \(input, block0, head\)"),
    ({"strategy.split_at": ["block7"]},
     r"strategy.split_at: cannot cut the model into 2 stages: boundary layer\(s\) \['block7'\]"),
    ({"training.num_workers": 3},
     r"data_parallel x pipeline_stages x tensor_parallel = 1x2x1 = 2 ranks, but "
     r"training.num_workers=3"),
    ({"strategy.micro_batches": 3},
     r"strategy.micro_batches=3 does not divide training.batch_size=16"),
    ({"strategy.schedule": "1f1b", "strategy.micro_batches": 1, "strategy.pipeline_stages": 2},
     r"strategy.schedule=1f1b needs strategy.micro_batches >= strategy.pipeline_stages"),
    ({"strategy.schedule": "interleaved_1f1b", "strategy.virtual_stages": 2,
      "strategy.micro_batches": 9, "strategy.pipeline_stages": 4, "training.num_workers": 4,
      "training.batch_size": 18, "model.kwargs": {"width": 8, "depth": 6}},
     r"strategy.schedule=interleaved_1f1b needs strategy.micro_batches to be a multiple of its "
     r"rounds \(micro_batches // pipeline_stages = 2\); got 9"),
    ({"strategy.schedule": "interleaved_1f1b", "strategy.virtual_stages": 3},
     r"cannot cut the model into 6 stages \(pipeline_stages x virtual_stages\): the model "
     r"\(sparkml_dist.models:deep_mlp\) has 5 top-level layers"),
    ({"backend.name": "horovod"},
     r"strategy.pipeline_stages=2 needs point-to-point send/recv, which backend.name=horovod "
     r"does not provide"),
    ({"strategy.pipeline_stages": 1, "strategy.tensor_parallel": 2,
      "model.factory": "sparkml_dist.models:mlp", "model.kwargs": {"hidden": [33]},
      "strategy.tensor_plan": {"0": "colwise", "2": "rowwise"}},
     r"strategy.tensor_plan: '0' \(colwise\) has 33 output features, not divisible by "
     r"strategy.tensor_parallel=2"),
    ({"strategy.pipeline_stages": 1, "strategy.tensor_parallel": 2,
      "model.factory": "sparkml_dist.models:mlp", "model.kwargs": {"hidden": [32]},
      "strategy.tensor_plan": {"1": "colwise"}},
     r"strategy.tensor_plan names '1' \(colwise\), which is ReLU of sparkml_dist.models:mlp; "
     r"plan nn.Linear layers only: 0, 2"),
    ({"strategy.pipeline_stages": 1, "strategy.tensor_parallel": 2},
     r"strategy.tensor_parallel=2: the model \(sparkml_dist.models:deep_mlp\) has no two "
     r"nn.Linear layers with only element-wise layers between them"),
])
def test_driver_refuses_with_the_setting_named(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        check_before_launch(mp_job(**overrides))


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match=r"strategy.pipeline_stages must be an integer >= 1"):
        mp_job(**{"strategy.pipeline_stages": 0})
    with pytest.raises(ConfigError, match="pipeline and tensor parallelism together are not "
                                          "supported yet"):
        mp_job(**{"strategy.tensor_parallel": 2})
    with pytest.raises(ConfigError, match=r"strategy.tensor_plan values must be one of colwise, "
                                          r"rowwise; got \{'0': 'sequence'\}"):
        mp_job(**{"strategy.pipeline_stages": 1, "strategy.tensor_parallel": 2,
                  "strategy.tensor_plan": {"0": "sequence"}})
    with pytest.raises(ConfigError, match=r"strategy.virtual_stages=1 with strategy.schedule="
                                          r"interleaved_1f1b: interleaved_1f1b needs "
                                          r"virtual_stages >= 2"):
        mp_job(**{"strategy.schedule": "interleaved_1f1b"})
    with pytest.raises(ConfigError,
                       match=r"strategy.schedule: 'zero_bubble' is not one of 'gpipe', '1f1b'"):
        mp_job(**{"strategy.schedule": "zero_bubble"})


def test_data_layout_gives_each_replica_one_shard_read_by_its_first_stage():
    layout = data_layout(mp_job(4, **{"strategy.data_parallel": 2, "strategy.pipeline_stages": 2}))
    assert layout.num_shards == 2 and layout.shards_of_rank == ((0,), (), (1,), ())


# -- real gloo ranks against one process -----------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return digits(900)


def _max_diff(got, ref):
    assert set(got) == set(ref)
    return max(float((got[k] - ref[k]).abs().max()) for k in ref)


@pytest.mark.parametrize("stages, schedule, micro, virtual", [
    (2, "gpipe", 4, 1), (2, "1f1b", 4, 1), (3, "gpipe", 2, 1), (3, "1f1b", 4, 1),
    (2, "interleaved_1f1b", 4, 2)])
def test_pipeline_equals_the_reference(data, tmp_path, stages, schedule, micro, virtual):
    cfg = mp_job(stages, **{"strategy.schedule": schedule, "strategy.micro_batches": micro,
                            "strategy.virtual_stages": virtual})
    res = _ok(run_ranks(cfg, data, str(tmp_path)))
    assert _max_diff(final_model(str(tmp_path)), reference_weights(cfg, data, (0,))) < TOL
    rows = [m for _, m in res["sink"] if "pipeline/idle_share" in m]
    assert rows and all(0 <= m[f"pipeline/idle_share_stage{s}"] < 1
                        for m in rows for s in range(stages))
    assert rows[-1]["pipeline/ideal_bubble"] == pytest.approx(
        ideal_bubble(stages, micro, virtual))
    # deep_mlp width 32, batch 16, float32: each boundary between chunks carries 16*32*4 bytes
    # forward and the same backward; the labels (int64) go from the first stage to the last.
    assert rows[-1]["comm/activation_bytes_per_step"] == \
        2 * (stages * virtual - 1) * 16 * 32 * 4
    assert rows[-1]["comm/input_bytes_per_step"] == 16 * 8
    assert all(m["memory/state_bytes_max_rank"] > 0 and m["memory/saved_bytes_max_rank"] > 0
               for m in rows)
    # one replica: 16 rows a step, however many stages share them
    assert rows[-1]["perf/samples_per_s"] * rows[-1]["time/step_s"] == pytest.approx(16)
    assert res["metrics"]["val/accuracy"] > 0.5


def test_named_split_pipeline_equals_the_reference(data, tmp_path):
    cfg = mp_job(2, epochs=1, **{"strategy.split_at": ["block2"]})
    _ok(run_ranks(cfg, data, str(tmp_path)))
    assert _max_diff(final_model(str(tmp_path)), reference_weights(cfg, data, (0,))) < TOL


def tp_job(world: int = 2, **extra) -> JobConfig:
    return mp_job(world, **{"model.factory": "sparkml_dist.models:mlp",
                            "model.kwargs": {"hidden": [32, 16]}, "optimizer.name": "adam",
                            "optimizer.lr": 0.01, "strategy.pipeline_stages": 1,
                            "strategy.tensor_parallel": world, **extra})


def test_tensor_parallel_equals_the_reference(data, tmp_path):
    cfg = tp_job()  # default plan: "0" colwise, "2" rowwise, "4" whole
    res = _ok(run_ranks(cfg, data, str(tmp_path)))
    assert _max_diff(final_model(str(tmp_path)), reference_weights(cfg, data, (0,))) < TOL
    from sparkml_dist.training.checkpoint import load_part, part_file
    from sparkml_dist.training.local_store import DirectoryCheckpointStore

    store = DirectoryCheckpointStore(str(tmp_path))
    name = store.complete_names()[0]
    part = load_part(store, name, store.read_meta(name), part_file(1))
    assert part["model"]["0.weight"].shape == (16, 64), "rank 1 holds half of layer 0's rows"
    assert part["model"]["2.weight"].shape == (16, 16), "and half of layer 2's columns"
    assert res["metrics"]["val/accuracy"] > 0.5


@pytest.mark.parametrize("inner", ["pipeline", "tensor"])
def test_hybrid_2x2_mesh_equals_the_reference(data, tmp_path, inner):
    extra = {"strategy.data_parallel": 2}
    cfg = mp_job(4, **{**extra, "strategy.pipeline_stages": 2}) if inner == "pipeline" else \
        tp_job(4, **{**extra, "strategy.tensor_parallel": 2})
    res = _ok(run_ranks(cfg, data, str(tmp_path)))
    assert _max_diff(final_model(str(tmp_path)), reference_weights(cfg, data, (0, 2))) < TOL
    last = [m for _, m in res["sink"] if "perf/samples_per_s" in m][-1]
    assert last["perf/samples_per_s"] * last["time/step_s"] == pytest.approx(32)  # 2 x 16 rows


def _same(a, b, where: str) -> None:
    """``a`` and ``b`` equal bit for bit (tensors) or by value, recursively."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs after resume"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            _same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _assert_checkpoints_equal(a_dir: str, b_dir: str, world: int) -> None:
    """The newest checkpoint of two runs: every part (the shared model, each rank's stage or
    shards, optimizer and schedule) equal bit for bit."""
    from sparkml_dist.training.checkpoint import load_part, part_file
    from sparkml_dist.training.local_store import DirectoryCheckpointStore

    a, b = DirectoryCheckpointStore(a_dir), DirectoryCheckpointStore(b_dir)
    name = a.complete_names()[0]
    assert b.complete_names()[0] == name
    for part in ["shared.pt"] + [part_file(r) for r in range(world)]:
        _same(load_part(a, name, a.read_meta(name), part),
              load_part(b, name, b.read_meta(name), part), part)


@pytest.mark.parametrize("kind, killed", [("pipeline", 2), ("tensor", 1)])
def test_killed_rank_resumes_bitwise(data, tmp_path, kind, killed):
    cfg = (mp_job(3, epochs=2, **{"strategy.schedule": "1f1b", "strategy.micro_batches": 4})
           if kind == "pipeline" else tp_job(2, epochs=2))
    cfg = cfg.replace(**{"checkpoint.every_steps": 10})
    clean, faulted = str(tmp_path / "clean"), str(tmp_path / "faulted")
    _ok(run_ranks(cfg, data, clean))
    first = run_ranks(cfg.replace(**{"fault.inject": {"rank": killed, "step": 25}}), data,
                      faulted)
    assert first[killed] == ("died", 17) and first[0][0] != "ok"
    second = _ok(run_ranks(cfg, data, faulted, attempt=1))
    assert second["resumed_from"] == 20
    _assert_checkpoints_equal(clean, faulted, cfg.training.num_workers)


def test_resume_on_another_mesh_is_refused(data, tmp_path):
    cfg = tp_job(2, epochs=1, **{"checkpoint.every_steps": 10})
    _ok(run_ranks(cfg, data, str(tmp_path)))
    other = cfg.replace(**{"strategy.tensor_parallel": 1, "strategy.pipeline_stages": 2})
    res = run_ranks(other, data, str(tmp_path), attempt=1)
    assert all(status == "error" for status, _ in res.values())
    assert "mesh (data x pipeline x tensor): '1x1x2' -> '1x2x1'" in res[0][1]
