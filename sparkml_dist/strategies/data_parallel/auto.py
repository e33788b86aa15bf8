"""``strategy.compression.name: auto``: measure the link once at start-up and compress only where
it pays.

Rank 0 times, on the real group and at the model's gradient size, (a) a dense float32 allreduce
and (b) the candidate's own collective on its payload plus its local encode/decode, alternately,
seven times each. The candidate is used only if both the ratio of medians and the ratio of best
times of (a) to (b) reach ``auto_min_speedup``; otherwise gradients go uncompressed. Every
rank runs the same collectives; rank 0's decision is broadcast, logged, and stored in the
checkpoint so a resumed job keeps it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from sparkml_dist.algo.compression import int8, topk
from sparkml_dist.config import CompressionConfig

log = logging.getLogger(__name__)

_REPS = 7
_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _interleaved(a: Callable[[], None], b: Callable[[], None], reps: int = _REPS,
                 device: torch.device | None = None) -> tuple[list[float], list[float]]:
    """Times of ``a`` and ``b`` run alternately (after one warm-up of each), so a burst of load
    on a shared machine hits both alike. On a GPU each timing waits for the device before and
    after: a collective returns once its kernels are queued, not done."""
    def sync() -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    a()
    b()
    ta, tb = [], []
    for _ in range(reps):
        for fn, out in ((a, ta), (b, tb)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return ta, tb


def _payload_step(name: str, grad: torch.Tensor, cfg: CompressionConfig, pg: object,
                  world: int, matrices: list[tuple[int, int]]) -> Callable[[], None]:
    """One step of the candidate: encode, its collective, decode."""
    n = grad.numel()
    if name in ("fp16", "bf16"):
        dtype = torch.float16 if name == "fp16" else torch.bfloat16

        def cast() -> None:
            wire = grad.to(dtype)
            dist.all_reduce(wire, group=pg)
            grad.copy_(wire)
        return cast
    if name == "int8":
        def q8() -> None:
            q, s = int8.quantize(grad)
            out = torch.empty(world * (n + 4), dtype=torch.int8, device=grad.device)
            _gather(out, torch.cat([q, s.view(torch.int8)]), group=pg)
            rows = out.view(world, n + 4)
            int8.mean_of_quantized([r[:n] for r in rows],
                                   [r[n:].clone().view(torch.float32) for r in rows])
        return q8
    if name == "topk":
        k = topk.k_for(n, cfg.topk_ratio)

        def sparse() -> None:
            idx, val, _ = topk.compress(grad, torch.zeros_like(grad), k)
            out = torch.empty(world * 2 * k, device=grad.device)
            _gather(out, torch.cat([idx.view(torch.float32), val]), group=pg)
            rows = out.view(world, 2 * k)
            topk.decompress_mean([r[:k].contiguous().view(torch.int32) for r in rows],
                                 [r[k:] for r in rows], n)
        return sparse
    # powersgd: one power iteration per matrix (two small allreduces of P and Q)
    r = cfg.powersgd_rank
    mats = [torch.randn(a, b).to(grad.device) for a, b in matrices]

    def low_rank() -> None:
        ps = [m @ torch.randn(m.shape[1], min(r, *m.shape), device=m.device) for m in mats]
        flat_p = (torch.cat([p.reshape(-1) for p in ps]) if ps
                  else torch.zeros(1, device=grad.device))
        dist.all_reduce(flat_p, group=pg)
        qs = [m.T @ torch.linalg.qr(p).Q for m, p in zip(mats, ps)]
        flat_q = (torch.cat([q.reshape(-1) for q in qs]) if qs
                  else torch.zeros(1, device=grad.device))
        dist.all_reduce(flat_q, group=pg)
    return low_rank


def choose(comm: object, model: nn.Module, cfg: CompressionConfig) -> str:
    """The compressor this job should use: ``cfg.auto_candidate`` or ``none``."""
    pg = comm.process_group  # type: ignore[attr-defined]
    world = comm.world_size  # type: ignore[attr-defined]
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    device = getattr(comm, "device", torch.device("cpu"))  # NCCL groups take device tensors
    grad = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
    matrices = [(p.shape[0], p[0].numel()) for p in model.parameters() if p.dim() >= 2]
    dense = grad.clone()
    td, tc = _interleaved(lambda: dist.all_reduce(dense, group=pg),
                          _payload_step(cfg.auto_candidate, grad.clone(), cfg, pg, world, matrices),
                          device=device)
    # Both the typical and the best case must favour the candidate: a probe thrown off by load
    # on one side never switches compression on.
    measured = torch.tensor([statistics.median(td), statistics.median(tc), min(td), min(tc)],
                            dtype=torch.float64)
    comm.broadcast(measured, 0)  # type: ignore[attr-defined]
    t_dense, t_cand, best_dense, best_cand = (float(v) for v in measured)
    speedup = min(t_dense / max(t_cand, 1e-12), best_dense / max(best_cand, 1e-12))
    chosen = cfg.auto_candidate if speedup >= cfg.auto_min_speedup else "none"
    log.info("compression auto: dense allreduce %.3f ms, %s %.3f ms (%.2fx, need %.2fx): using %s",
             t_dense * 1e3, cfg.auto_candidate, t_cand * 1e3, speedup, cfg.auto_min_speedup,
             chosen)
    return chosen
