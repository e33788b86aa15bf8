"""Gradient compression in the data_parallel strategy: the pure math against numpy, then every
compressor through the same body on 2 and 3 real gloo ranks against a single-process reference,
and a killed-and-resumed run per compressor against an uninterrupted one."""

import numpy as np
import pytest
import torch

from sparkml_dist.algo.compression import int8, topk
from sparkml_dist.config import JobConfig
from tests.ranks import digits, final_model, reference_weights, run_ranks

COMPRESSORS = ["fp16", "bf16", "int8", "topk", "powersgd"]


# -- pure math ------------------------------------------------------------------------------

def test_int8_matches_a_numpy_reference_and_bounds_the_error():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=1000).astype(np.float32))
    q, scale = int8.quantize(x)
    ref_scale = np.abs(x.numpy()).max() / 127
    ref_q = np.clip(np.round(x.numpy() / ref_scale), -127, 127).astype(np.int8)
    assert q.dtype == torch.int8 and np.array_equal(q.numpy(), ref_q)
    assert float(scale) == pytest.approx(ref_scale, rel=1e-6)
    assert float((int8.dequantize(q, scale) - x).abs().max()) <= ref_scale / 2 + 1e-7
    zeros = torch.zeros(5)
    assert torch.equal(int8.dequantize(*int8.quantize(zeros)), zeros)
    # mean of two ranks' payloads is the mean of their dequantized values
    y = -2 * x
    m = int8.mean_of_quantized([int8.quantize(x)[0], int8.quantize(y)[0]],
                               [int8.quantize(x)[1], int8.quantize(y)[1]])
    assert torch.allclose(m, (x + y) / 2, atol=2 * ref_scale)


def test_topk_keeps_the_largest_entries_and_error_feedback_loses_nothing():
    rng = np.random.default_rng(1)
    g = torch.from_numpy(rng.normal(size=200).astype(np.float32))
    r = torch.from_numpy(rng.normal(size=200).astype(np.float32)) * 0.1
    k = topk.k_for(200, 0.05)
    assert k == 10 and topk.k_for(10, 1e-6) == 1
    idx, val, new_r = topk.compress(g, r, k)
    acc = (g + r).numpy()
    expected = np.sort(np.argsort(-np.abs(acc), kind="stable")[:k])
    assert np.array_equal(idx.numpy(), expected)
    assert np.allclose(val.numpy(), acc[expected])
    dense = topk.decompress_mean([idx], [val], 200)
    assert torch.allclose(dense + new_r, g + r)  # sent + kept == gradient + old residual
    assert topk.wire_bytes(k) == 80


# -- N ranks ------------------------------------------------------------------------------

def job(world: int, compression: str = "none", epochs: int = 4, **extra) -> JobConfig:
    return JobConfig().replace(**{
        "model.kwargs": {"hidden": [64]}, "optimizer.name": "sgd", "optimizer.lr": 0.05,
        "optimizer.momentum": 0.9, "training.num_workers": world, "training.batch_size": 32,
        "training.epochs": epochs, "training.seed": 3, "training.log_every_steps": 10,
        "backend.timeout_s": 60.0, "checkpoint.every_steps": 0,
        "strategy.compression.name": compression, "strategy.compression.topk_ratio": 0.1,
        "strategy.compression.powersgd_start_step": 10, **extra})


def _ok(results):
    bad = {r: v for r, v in results.items() if v[0] != "ok"}
    assert not bad, bad
    return results[0][1]


@pytest.fixture(scope="module")
def data():
    return digits()


@pytest.fixture(scope="module")
def uncompressed(data, tmp_path_factory):
    """Uncompressed runs at 2 and 3 ranks: equal to the reference, and the accuracy bar."""
    out = {}
    for world in (2, 3):
        d = str(tmp_path_factory.mktemp(f"none{world}"))
        cfg = job(world)
        out[world] = (_ok(run_ranks(cfg, data, d)), final_model(d), reference_weights(cfg, data))
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_uncompressed_equals_the_single_process_reference(uncompressed, world):
    _, dist_w, ref_w = uncompressed[world]
    for name, ref in ref_w.items():
        diff = (dist_w[name] - ref).abs().max().item()
        assert diff <= 1e-5, f"{name}: {diff:.2e}"


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("compression", COMPRESSORS)
def test_compressed_reaches_uncompressed_accuracy(data, uncompressed, tmp_path, world,
                                                  compression):
    base = uncompressed[world][0]["metrics"]["val/accuracy"]
    res = _ok(run_ranks(job(world, compression), data, str(tmp_path)))
    acc = res["metrics"]["val/accuracy"]
    assert acc >= base - 0.01, f"{compression} at {world} ranks: {acc:.4f} vs {base:.4f}"
    m = res["metrics"]
    assert m["comm/dense_bytes_per_step"] > 0 and m["comm/bytes_per_step"] > 0
    ratio = m["comm/compression_ratio"]
    floor = {"fp16": 1.99, "bf16": 1.99, "int8": 3.9, "topk": 4.0, "powersgd": 2.0}[compression]
    assert ratio >= floor, f"{compression}: ratio {ratio:.2f}"
    assert m["time/compress_s"] >= 0
    # the compressed run is not the uncompressed one in disguise
    assert not torch.equal(final_model(str(tmp_path))["0.weight"],
                           uncompressed[world][1]["0.weight"])


@pytest.mark.parametrize("compression", ["none"] + COMPRESSORS)
def test_killed_rank_resumes_bitwise_for_every_compressor(data, tmp_path, compression):
    cfg = job(2, compression, epochs=2, **{"checkpoint.every_steps": 7})
    clean = str(tmp_path / "clean")
    _ok(run_ranks(cfg, data, clean))
    faulted = str(tmp_path / "faulted")
    # rank 1 exits hard at step 31 (epoch 1, after the checkpoint at step 28)
    first = run_ranks(cfg.replace(**{"fault.inject": {"rank": 1, "step": 31}}), data, faulted)
    assert first[1][0] == "died" and first[1][1] == 17
    assert first[0][0] != "ok"
    second = run_ranks(cfg, data, faulted, attempt=1)
    assert _ok(second)["resumed_from"] == 28
    a, b = final_model(clean), final_model(faulted)
    for name in a:
        assert torch.equal(a[name], b[name]), f"{compression}: {name} differs after resume"


def test_auto_keeps_loopback_uncompressed(data, tmp_path):
    """On loopback a sparsifying compressor costs more than it saves: auto must not use it.
    The model is large enough (about 85k gradient values) that the link's bandwidth, not its
    latency, sets the allreduce's time: for a few thousand values both collectives cost about
    one round trip, and on a loaded machine either may measure faster."""
    cfg = job(2, "auto", epochs=1, **{"strategy.compression.auto_candidate": "topk",
                                      "model.kwargs": {"hidden": [256, 256]}})
    _ok(run_ranks(cfg, data, str(tmp_path)))
    from sparkml_dist.training.checkpoint import SHARED_PART, load_part
    from sparkml_dist.training.local_store import DirectoryCheckpointStore

    store = DirectoryCheckpointStore(str(tmp_path))
    name = store.complete_names()[0]
    assert load_part(store, name, store.read_meta(name), SHARED_PART)["compression"] == "none"
    ref = reference_weights(cfg, data)
    got = final_model(str(tmp_path))
    assert all((got[k] - ref[k]).abs().max() <= 1e-5 for k in ref)


def test_comm_timing_is_off_by_default_and_sampled_when_asked(data, tmp_path):
    off = _ok(run_ranks(job(2, epochs=1), data, str(tmp_path / "off")))
    assert off["sink"] and not any("time/comm_s" in m for _, m in off["sink"])
    on = _ok(run_ranks(job(2, epochs=1, **{"strategy.comm_timing_every_steps": 5}), data,
                       str(tmp_path / "on")))
    timed = [m["time/comm_s"] for _, m in on["sink"] if "time/comm_s" in m]
    assert timed and all(t > 0 for t in timed)
    assert all(0 <= m["time/comm_share"] <= 1 for _, m in on["sink"] if "time/comm_share" in m)
