"""DDP communication hooks for gradient compression, in torch's ``hook(state, bucket) -> Future``
contract.

torch provides fp16/bf16 casts and PowerSGD (``torch.distributed.algorithms.ddp_comm_hooks``); they
are reused and only wrapped here, to count bytes and to key their state by parameter name. int8
and top-k are written here on top of the pure math in :mod:`sparkml_dist.algo.compression`.

Every hook state derives from :class:`HookState`, which counts per step the bytes this rank puts
on the wire (and what dense float32 would have cost) and, on sampled steps only, the time
communication was in flight. Counters are cheap additions; no hook exists just to time unless
``strategy.comm_timing_every_steps`` asks for it.

Checkpointable state (top-k residuals, PowerSGD's error, factors, iteration and RNG) is keyed by
parameter names, not DDP bucket indices: DDP rebuilds its buckets after the first step, and a
resumed job starts with freshly built ones.
"""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime.

import logging
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

from sparkml_dist.algo.compression import int8, topk

log = logging.getLogger(__name__)

Future = torch.futures.Future


class HookState:
    """Counters shared by every hook. ``timed`` is set by the strategy on sampled steps."""

    def __init__(self, process_group: Any) -> None:
        self.process_group = process_group
        self.world_size = dist.get_world_size(process_group)
        self.timed = False
        self._lock = threading.Lock()
        self.wire_bytes = 0
        self.dense_bytes = 0
        self.compress_s = 0.0
        self.comm_s = 0.0
        self.names: dict[int, str] = {}  # id(param) -> name, filled by the strategy

    def count(self, wire: int, dense: int, compress_s: float = 0.0) -> None:
        with self._lock:
            self.wire_bytes += wire
            self.dense_bytes += dense
            self.compress_s += compress_s

    def add_comm(self, seconds: float) -> None:
        with self._lock:
            self.comm_s += seconds

    def take(self) -> dict[str, float]:
        """Totals since the last call (then reset)."""
        with self._lock:
            out = {"wire_bytes": float(self.wire_bytes), "dense_bytes": float(self.dense_bytes),
                   "compress_s": self.compress_s, "comm_s": self.comm_s}
            self.wire_bytes = self.dense_bytes = 0
            self.compress_s = self.comm_s = 0.0
        return out

    def bucket_names(self, bucket: dist.GradBucket) -> tuple[str, ...]:
        return tuple(self.names[id(p)] for p in bucket.parameters())

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state of this rank (empty for stateless compressors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def _timed(self, fut: Future, t0: float) -> Future:
        """``fut``, recording its time in flight when this step is sampled. On a GPU the
        callback runs once the collective is queued, not done, so a sampled step waits there
        for the device (timing is opt-in and sampled: other steps never wait)."""
        if not self.timed:
            return fut

        def done(f: Future) -> Any:
            value = f.value()
            tensor = value[0] if isinstance(value, list) else value
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                torch.cuda.synchronize(tensor.device)
            self.add_comm(time.perf_counter() - t0)
            return value

        return fut.then(done)


def _dense(bucket: dist.GradBucket) -> int:
    buf = bucket.buffer()
    return buf.numel() * 4


def allreduce_hook(state: HookState, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """Plain averaging allreduce, timed on sampled steps (used only when timing is on)."""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    state.count(buf.numel() * buf.element_size(), _dense(bucket))
    fut = default_hooks._allreduce_fut(state.process_group, buf)
    return state._timed(fut, t0)


def _cast_hook(torch_hook: Callable[[Any, dist.GradBucket], Future], wire_dtype: torch.dtype
               ) -> Callable[[HookState, dist.GradBucket], Future]:
    def hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        t0 = time.perf_counter()
        fut = torch_hook(state.process_group, bucket)
        n = bucket.buffer().numel()
        state.count(n * torch.empty((), dtype=wire_dtype).element_size(), _dense(bucket),
                    time.perf_counter() - t0)
        return state._timed(fut, t0)

    hook.__name__ = f"{wire_dtype}_hook".replace("torch.", "")
    return hook


fp16_hook = _cast_hook(default_hooks.fp16_compress_hook, torch.float16)
"""Gradients sent as float16 (torch's ``fp16_compress_hook``)."""
bf16_hook = _cast_hook(default_hooks.bf16_compress_hook, torch.bfloat16)
"""Gradients sent as bfloat16 (torch's ``bf16_compress_hook``)."""


def _all_gather(state: HookState, payload: torch.Tensor) -> tuple[Future, torch.Tensor]:
    """Start gathering every rank's ``payload``; the future completes when ``rows`` (one row per
    rank) is filled."""
    out = torch.empty(state.world_size * payload.numel(), dtype=payload.dtype,
                      device=payload.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    work = gather(out, payload, group=state.process_group, async_op=True)
    return work.get_future(), out.view(state.world_size, payload.numel())


def _gather_then(state: HookState, buf: torch.Tensor, payload: torch.Tensor, t0: float,
                 mean_of: Callable[[torch.Tensor], torch.Tensor]) -> Future:
    """Gather every rank's ``payload``, then write ``mean_of(rows)`` (the decoded average) into
    the bucket ``buf``; decoding time counts as compression time."""
    fut, rows = _all_gather(state, payload)

    def decode(f: Future) -> torch.Tensor:
        t1 = time.perf_counter()
        f.wait()
        buf.copy_(mean_of(rows))
        state.count(0, 0, time.perf_counter() - t1)
        return buf

    return state._timed(fut.then(decode), t0)


def int8_hook(state: HookState, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """Scaled int8 payloads exchanged with all_gather, averaged locally
    (:mod:`sparkml_dist.algo.compression.int8`)."""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    n = buf.numel()
    q, scale = int8.quantize(buf)
    payload = torch.cat([q, scale.view(torch.int8)])  # the scale's 4 bytes ride along
    state.count(int8.wire_bytes(n), _dense(bucket), time.perf_counter() - t0)
    return _gather_then(state, buf, payload, t0, lambda rows: int8.mean_of_quantized(
        [r[:n] for r in rows], [r[n:].clone().view(torch.float32) for r in rows]))


class TopKState(HookState):
    """Top-k settings and this rank's error-feedback residual per parameter."""

    def __init__(self, process_group: Any, ratio: float, error_feedback: bool) -> None:
        super().__init__(process_group)
        self.ratio = ratio
        self.error_feedback = error_feedback
        self.residuals: dict[str, torch.Tensor] = {}

    def bucket_residual(self, bucket: dist.GradBucket) -> torch.Tensor | None:
        if not self.error_feedback:
            return None
        parts = []
        for name, g in zip(self.bucket_names(bucket), bucket.gradients()):
            r = self.residuals.get(name)
            parts.append(r.reshape(-1).to(g.device) if r is not None  # restored on the CPU
                         else torch.zeros(g.numel(), dtype=g.dtype, device=g.device))
        return torch.cat(parts)

    def keep_residual(self, bucket: dist.GradBucket, residual: torch.Tensor) -> None:
        offset = 0
        for name, g in zip(self.bucket_names(bucket), bucket.gradients()):
            self.residuals[name] = residual[offset:offset + g.numel()].clone()
            offset += g.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}


def topk_hook(state: TopKState, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """Top-k entries of gradient + residual, exchanged as (index, value) pairs with all_gather
    (:mod:`sparkml_dist.algo.compression.topk`)."""
    t0 = time.perf_counter()
    buf = bucket.buffer()
    n = buf.numel()
    k = topk.k_for(n, state.ratio)
    residual = state.bucket_residual(bucket)
    if residual is not None:
        residual = residual.to(buf.device)
    idx, values, new_residual = topk.compress(buf, residual, k)
    if state.error_feedback:
        state.keep_residual(bucket, new_residual)
    payload = torch.cat([idx.view(torch.float32), values.float()])  # indices as raw 32-bit words
    state.count(topk.wire_bytes(k), _dense(bucket), time.perf_counter() - t0)
    return _gather_then(state, buf, payload, t0, lambda rows: topk.decompress_mean(
        [r[:k].contiguous().view(torch.int32) for r in rows], [r[k:] for r in rows], n,
        buf.dtype))


class PowerSGDHookState(HookState):
    """torch's ``PowerSGDState``, with its per-bucket memories saved per parameter name.

    torch keys the local error and the P/Q factors by bucket index, each a flat concatenation over
    the bucket's tensors (P/Q in torch's order: compressible tensors grouped by matrix shape).
    :meth:`state_dict` cuts them into per-parameter pieces and :meth:`adopt` reassembles them for
    whatever bucket a parameter lands in after a restart.
    """

    def __init__(self, process_group: Any, rank: int, warm_start: bool, error_feedback: bool,
                 start_iter: int, min_compression_rate: float, seed: int) -> None:
        super().__init__(process_group)
        self.inner = powerSGD_hook.PowerSGDState(
            process_group=process_group, matrix_approximation_rank=rank,
            start_powerSGD_iter=start_iter, min_compression_rate=min_compression_rate,
            use_error_feedback=error_feedback, warm_start=warm_start, random_seed=seed)
        self.layout: dict[int, list[tuple[str, torch.Size]]] = {}
        self._pending: dict[str, dict[str, torch.Tensor]] = {}

    def _pq_order(self, params: list[tuple[str, torch.Size]]) -> list[tuple[str, int, int]]:
        """(name, P length, Q length) of the tensors torch compresses, in its memory order."""
        groups: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
        for name, shape in params:
            n = shape[0] if len(shape) else 1
            m = max(1, int(torch.Size(shape).numel()) // max(1, n))
            r = min(n, m, self.inner.matrix_approximation_rank)
            if powerSGD_hook._should_compress(n, m, r, self.inner.min_compression_rate)[0]:
                groups.setdefault((n, m), []).append((name, n * r, m * r))
        return [item for group in groups.values() for item in group]

    def adopt(self, bucket: dist.GradBucket) -> None:
        """Record the bucket's parameters; lay memories out for its current parameter order.

        Memories move between layouts in two cases: after a restore (pieces from the checkpoint)
        and when DDP rebuilds its buckets (a resumed job compresses from its first step, before
        DDP's rebuild after that step changes the order within a bucket)."""
        params = [(name, g.shape) for name, g in zip(self.bucket_names(bucket), bucket.gradients())]
        index = bucket.index()
        prev = self.layout.get(index)
        if prev is not None and prev != params:
            self._pending.update(self._split(index, prev))
            for memory in (self.inner.error_dict, self.inner.p_memory_dict,
                           self.inner.q_memory_dict):
                memory.pop(index, None)
        self.layout[index] = params
        if self._pending:
            self._assemble(index, params, bucket.buffer().device)

    def _assemble(self, index: int, params: list[tuple[str, torch.Size]],
                  device: torch.device) -> None:
        names = [n for n, _ in params]
        pq = self._pq_order(params)
        pieces = {"error": [self._pending.get(n, {}).get("error") for n in names],
                  "p": [self._pending.get(n, {}).get("p") for n, _, _ in pq],
                  "q": [self._pending.get(n, {}).get("q") for n, _, _ in pq]}
        targets = {"error": self.inner.error_dict, "p": self.inner.p_memory_dict,
                   "q": self.inner.q_memory_dict}
        for key, parts in pieces.items():
            if parts and all(p is not None for p in parts):
                targets[key][index] = torch.cat([p.reshape(-1) for p in parts]).to(device)
            elif any(p is not None for p in parts):
                log.warning("PowerSGD %s memory of bucket %d is only partly known; it starts "
                            "afresh", key, index)
        for n in names:
            self._pending.pop(n, None)

    def _split(self, index: int, params: list[tuple[str, torch.Size]]
               ) -> dict[str, dict[str, torch.Tensor]]:
        """The memories of bucket ``index`` (laid out for ``params``), cut per parameter."""
        s = self.inner
        out: dict[str, dict[str, torch.Tensor]] = {}
        err = s.error_dict.get(index)
        if err is not None:
            offset = 0
            for name, shape in params:
                size = int(torch.Size(shape).numel())
                out.setdefault(name, {})["error"] = err[offset:offset + size].detach().clone()
                offset += size
        p, q = s.p_memory_dict.get(index), s.q_memory_dict.get(index)
        if p is not None and q is not None:
            po = qo = 0
            for name, plen, qlen in self._pq_order(params):
                out.setdefault(name, {})["p"] = p[po:po + plen].detach().clone()
                out[name]["q"] = q[qo:qo + qlen].detach().clone()
                po, qo = po + plen, qo + qlen
        return out

    def state_dict(self) -> dict[str, Any]:
        s = self.inner
        kind, keys, pos, has_gauss, gauss = s.rng.get_state()
        per_param: dict[str, dict[str, torch.Tensor]] = {}
        for index, params in self.layout.items():
            for name, pieces in self._split(index, params).items():
                per_param[name] = {k: _cpu(v) for k, v in pieces.items()}
        for name, pieces in self._pending.items():  # restored, not yet adopted by a bucket
            per_param.setdefault(name, {k: _cpu(v) for k, v in pieces.items()})
        return {"iter": s.iter, "params": per_param,
                "rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)},
                "numel_before": s.total_numel_before_compression,
                "numel_after": s.total_numel_after_compression}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.inner
        s.iter = int(state["iter"])
        r = state["rng"]
        s.rng.set_state(("MT19937", r["keys"].numpy().astype(np.uint32), r["pos"],
                         r["has_gauss"], r["gauss"]))
        s.total_numel_before_compression = int(state["numel_before"])
        s.total_numel_after_compression = int(state["numel_after"])
        self._pending = {k: dict(v) for k, v in state["params"].items()}


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu().clone()


def powersgd_hook(state: PowerSGDHookState, bucket: dist.GradBucket
                   ) -> torch.futures.Future[torch.Tensor]:
    """torch's ``powerSGD_hook`` (Vogels et al. 2019), counting the numbers it sends."""
    t0 = time.perf_counter()
    state.adopt(bucket)
    inner = state.inner
    before = inner.total_numel_after_compression
    compressing = inner.iter >= inner.start_powerSGD_iter
    fut = powerSGD_hook.powerSGD_hook(inner, bucket)
    n = bucket.buffer().numel()
    sent = (inner.total_numel_after_compression - before) if compressing else n
    state.count(sent * 4, _dense(bucket), time.perf_counter() - t0)
    return state._timed(fut, t0)
