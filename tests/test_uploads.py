"""Draining background checkpoint uploads on two real gloo ranks: the ranks go on as soon as
the last upload is stored, not a poll interval later, and a failed upload stops both."""

import multiprocessing as mp
import time
import traceback

import pytest

from sparkml_dist.errors import CheckpointError
from tests.ranks import free_port
from tests.test_comm import _join

POLL_S = 5.0  # far longer than any upload here: a drain that sleeps a whole poll shows


def _rank(rank, port, upload_s, fail, out):
    from sparkml_dist.training.uploads import BackgroundUploads

    try:
        comm = _join(rank, 2, port, "gloo")
        try:
            uploads = BackgroundUploads(timeout_s=60.0, poll_s=POLL_S)

            def job():
                time.sleep(upload_s)
                if fail:
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
    ctx = mp.get_context("spawn")
    out, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, upload_s[r], fail[r], out))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        return dict((r, (kind, value)) for r, kind, value in (out.get(timeout=120)
                                                             for _ in procs))
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()


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
