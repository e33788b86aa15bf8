"""Waiting on checkpoint uploads ends when the upload does, not a poll interval later: draining
background uploads on two real gloo ranks (a failed upload stops both), and rank 0 waiting for
other ranks' parts in a directory store before it commits (bounded, naming what is missing)."""

import threading
import time
import traceback

import pytest

from sparkml_dist.errors import CheckpointError
from sparkml_dist.training.checkpoint import wait_for_parts
from sparkml_dist.training.local_store import DirectoryCheckpointStore
from tests.ranks import spawn_ranks
from tests.test_comm import _join

POLL_S = 5.0  # far longer than any upload here: a drain that sleeps a whole poll shows


def _rank(rank, world, port, upload_s, fail, out):
    from sparkml_dist.training.uploads import BackgroundUploads

    try:
        comm = _join(rank, world, port, "gloo")
        try:
            uploads = BackgroundUploads(timeout_s=60.0, poll_s=POLL_S)

            def job():
                time.sleep(upload_s[rank])
                if fail[rank]:
                    raise OSError("the store refused the part")

            uploads.submit("ckpt-0000000002", job)
            t0 = time.monotonic()
            try:
                uploads.drain_together(comm)
                out.put((rank, "ok", time.monotonic() - t0))
            except CheckpointError as exc:
                out.put((rank, "error", str(exc)))
        finally:
            comm.close()
    except BaseException:  # noqa: BLE001 - reported to the test
        out.put((rank, "crash", traceback.format_exc()))


def _run(upload_s, fail):
    return spawn_ranks(_rank, 2, (upload_s, fail), timeout_s=120)


def test_drain_ends_when_the_slowest_upload_is_stored():
    got = _run(upload_s=(1.0, 0.05), fail=(False, False))
    for rank in (0, 1):
        kind, waited = got[rank]
        assert kind == "ok", got
        # Both ranks wait for rank 0's 1 s upload, and neither for a further 5 s poll.
        assert 0.8 <= waited < POLL_S - 1.0, f"rank {rank} drained in {waited:.2f} s"


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failed_upload_stops_every_rank_with_its_reason(failing):
    fail = tuple(r == failing for r in range(2))
    got = _run(upload_s=(0.3, 0.3), fail=fail)
    for rank in (0, 1):
        kind, text = got[rank]
        assert kind == "error", got
        assert f"rank {failing}: storing checkpoint ckpt-0000000002 failed" in text
        assert "the store refused the part" in text


def test_commit_waits_for_other_ranks_parts_and_goes_on_when_they_land(tmp_path):
    store = DirectoryCheckpointStore(tmp_path)
    name, part = "ckpt-0000000004", b"x" * 1000
    store.write_part(name, "rank-00001.pt", part[:10])  # an upload still under way

    def late_writer():
        time.sleep(0.5)
        store.write_part(name, "rank-00001.pt", part)

    writer = threading.Thread(target=late_writer)
    t0 = time.monotonic()
    writer.start()
    wait_for_parts(store, name, {"rank-00001.pt": len(part)}, timeout_s=30.0, poll_s=POLL_S)
    waited = time.monotonic() - t0
    writer.join()
    assert store.part_sizes(name)["rank-00001.pt"] == len(part)
    assert 0.5 <= waited < POLL_S - 1.0, f"waited {waited:.2f} s for a part stored after 0.5 s"


def test_commit_wait_is_bounded_and_names_the_missing_part(tmp_path):
    store = DirectoryCheckpointStore(tmp_path)
    store.write_part("ckpt-0000000004", "rank-00001.pt", b"done")
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as err:
        wait_for_parts(store, "ckpt-0000000004", {"rank-00001.pt": 4, "rank-00002.pt": 8},
                       timeout_s=1.0, poll_s=POLL_S)
    assert time.monotonic() - t0 < 3.0  # the bound, not the poll interval, ends the wait
    text = str(err.value)
    assert "rank-00002.pt" in text and "rank-00001.pt" not in text
    assert "not committed" in text
