"""Horovod backend: gradient averaging with ``hvd.DistributedOptimizer`` over Gloo (CPU) or NCCL.

Ranks are already running inside a Spark barrier stage, so nothing launches them: the torch
``TCPStore`` of the barrier rendezvous (rank 0 is its master) serves as a small key/value store.
Every rank publishes its host name; rank 0 starts Horovod's rendezvous server for that host
layout and publishes its ``host:port``; every rank then joins with
:func:`~sparkml_dist.comm.horovod_gloo.init_horovod`. Keys are namespaced by the launch attempt.

Environment variables this module sets in the executor's Python worker before ``hvd.init()``
(Horovod reads them there): ``HOROVOD_FUSION_THRESHOLD`` (bytes, from
``backend.fusion_threshold_mb``) plus the rendezvous variables of
:func:`~sparkml_dist.comm.horovod_gloo.horovod_env` (``HOROVOD_GLOO_TIMEOUT_SECONDS`` from
``backend.timeout_s`` among them).

Horovod is imported lazily; a missing or unsuitable build is reported as a deterministic error
pointing at ``scripts/build_horovod.sh``, so the driver does not relaunch for it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import socket
import time
from typing import Any

import torch
from torch import nn

from sparkml_dist.comm.base import Endpoint
from sparkml_dist.comm.horovod_gloo import (
    init_horovod, start_rendezvous_server, stop_rendezvous_server)
from sparkml_dist.config import BackendConfig
from sparkml_dist.errors import USER_ERROR_MARKER, RendezvousError, UserCodeError

log = logging.getLogger(__name__)

BUILD_HINT = ("build and install it on every executor with scripts/build_horovod.sh "
              "(Horovod 0.28.1 with PyTorch and Gloo)")
NCCL_HINT = ("rebuild it with HOROVOD_GPU_OPERATIONS=NCCL scripts/build_horovod.sh on every "
             "executor (set HOROVOD_NCCL_HOME if NCCL is not in a default location), or use "
             "backend.device=cpu or backend.name=torch")
_ERROR_VALUE = "error:"


def horovod_version() -> str | None:
    """Installed Horovod distribution version, read without importing Horovod."""
    try:
        return importlib.metadata.version("horovod")
    except importlib.metadata.PackageNotFoundError:
        return None


def run_tags(cfg: BackendConfig) -> dict[str, str]:
    """MLflow tags describing the Horovod settings of a job (the driver sets them on its run)."""
    return {
        "horovod.version": horovod_version() or "not installed on the driver",
        "horovod.controller": "gloo",
        "horovod.gradient_ops": "nccl" if cfg.device == "cuda" else "gloo",
        "horovod.compression": cfg.compression,
        "horovod.backward_passes_per_step": str(cfg.backward_passes_per_step),
        "horovod.fusion_threshold_bytes": str(fusion_threshold_bytes(cfg)),
    }


def fusion_threshold_bytes(cfg: BackendConfig) -> int:
    """``HOROVOD_FUSION_THRESHOLD`` for ``backend.fusion_threshold_mb`` (MiB)."""
    return int(cfg.fusion_threshold_mb * 2**20)


def import_horovod(device: torch.device) -> Any:
    """``horovod.torch``, or a deterministic error saying how to get a suitable build."""
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise UserCodeError(f"{USER_ERROR_MARKER} backend.name=horovod but horovod.torch cannot "
                            f"be imported on this executor ({exc}); {BUILD_HINT}.") from exc
    if not hvd.gloo_built():
        raise UserCodeError(f"{USER_ERROR_MARKER} backend.name=horovod but this Horovod was built "
                            f"without Gloo; {BUILD_HINT}.")
    if device.type == "cuda" and not hvd.nccl_built():
        raise UserCodeError(f"{USER_ERROR_MARKER} backend.device=cuda with backend.name=horovod "
                            f"needs Horovod built with NCCL, but Horovod {horovod_version()} on "
                            f"this executor was built without it; {NCCL_HINT}.")
    return hvd


class _StoreKV:
    """Bounded reads and writes of string values in the attempt's namespace of a torch store."""

    def __init__(self, store: Any, attempt: int, rank: int, timeout_s: float) -> None:
        self.store = store
        self.prefix = f"sparkml_dist/attempt-{attempt}/horovod/"
        self.rank = rank
        self.timeout_s = timeout_s

    def set(self, key: str, value: str) -> None:
        self.store.set(self.prefix + key, value)

    def get(self, key: str, what: str) -> str:
        full = self.prefix + key
        try:
            self.store.wait([full], datetime.timedelta(seconds=self.timeout_s))
            value = self.store.get(full).decode()
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a lost peer
            raise RendezvousError(
                f"rank {self.rank} waited up to {self.timeout_s:.0f}s for {what} (store key "
                f"{full!r}) and did not get it: {type(exc).__name__}: {exc}. The rank that "
                "publishes it probably failed (see its log); raise backend.timeout_s if the "
                "cluster is only slow.") from exc
        if value.startswith(_ERROR_VALUE):
            raise RendezvousError(f"rank {self.rank}: {what} is unavailable because "
                                  f"{value[len(_ERROR_VALUE):].strip()}")
        return value


class HorovodOptimizer:
    """The optimizer :meth:`HorovodCommunicator.wrap` returns to the training loop.

    ``inner`` is the caller's torch optimizer: it keeps its state and param groups, so an LR
    scheduler built on it before wrapping keeps working, and ``state_dict()`` (what the loop
    checkpoints) is the inner one's, loadable by a plain optimizer. ``dist`` is the
    ``hvd.DistributedOptimizer`` made from it, used for what Horovod adds: its backward hooks start
    each gradient's allreduce (averaged, optionally fp16 on the wire) as soon as it is ready, and
    :meth:`step` waits for them with ``dist.synchronize()`` (timed: that wait is
    :meth:`HorovodCommunicator.comm_seconds`) before ``inner.step()`` applies the update.

    With ``backward_passes_per_step = N > 1``, gradients of N consecutive loop steps accumulate
    locally; only every N-th :meth:`step` allreduces and updates, with the sum divided by N (the
    update of one global batch of N micro-batches per rank), and :meth:`zero_grad` clears only
    after an update. The LR schedule still counts loop steps, and a checkpoint taken between
    updates does not hold the partial sum: keep ``checkpoint.every_steps`` and the steps per epoch
    multiples of N for exact resumes.
    """

    def __init__(self, inner: torch.optim.Optimizer, dist: Any, passes_per_step: int) -> None:
        self.inner = inner
        self.dist = dist
        self.passes_per_step = passes_per_step
        self._pending = 0
        self.comm_s = 0.0

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, unless a gradient accumulation is under way."""
        if self._pending == 0:
            # Horovod's zero_grad takes no argument (it sets to None) and refuses to run while
            # allreduces are pending; clearing in place instead is the inner optimizer's job.
            if set_to_none:
                self.dist.zero_grad()
            else:
                self.inner.zero_grad(set_to_none=False)

    def step(self, closure: Any = None) -> Any:
        """Wait for the gradient allreduces and apply the update (every N-th call)."""
        if closure is not None:
            raise ValueError("HorovodOptimizer.step does not take a closure")
        self._pending += 1
        if self._pending < self.passes_per_step:
            return None
        t0 = time.perf_counter()
        self.dist.synchronize()
        self.comm_s += time.perf_counter() - t0
        if self.passes_per_step > 1:
            with torch.no_grad():
                for group in self.inner.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(self.passes_per_step)
        self._pending = 0
        return self.inner.step()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)

    def take_comm_seconds(self) -> float:
        s, self.comm_s = self.comm_s, 0.0
        return s


class HorovodCommunicator:
    """:class:`~sparkml_dist.comm.base.Communicator` over Horovod, joined via the torch store."""

    name = "horovod"

    def __init__(self, endpoint: Endpoint, device: torch.device, cfg: BackendConfig,
                 store: Any = None) -> None:
        self.rank = endpoint.rank
        self.world_size = endpoint.world_size
        self.device = device
        self.cfg = cfg
        self._hvd = import_horovod(device)
        self._server: Any = None
        self._optimizer: HorovodOptimizer | None = None
        if store is None:
            import torch.distributed as dist

            store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size,
                                  is_master=False,
                                  timeout=datetime.timedelta(seconds=endpoint.timeout_s))
        self._store = store  # rank 0 hosts it: keep it alive as long as the group
        kv = _StoreKV(store, endpoint.attempt, endpoint.rank, endpoint.timeout_s)
        kv.set(f"host/{self.rank}", socket.gethostname())
        hostnames = [kv.get(f"host/{r}", f"the host name of rank {r}")
                     for r in range(self.world_size)]
        if self.rank == 0:
            try:
                self._server, port = start_rendezvous_server(self.world_size, hostnames[0],
                                                             hostnames=hostnames)
            except Exception as exc:
                kv.set("rendezvous", f"{_ERROR_VALUE} rank 0 could not start Horovod's "
                                     f"rendezvous server: {type(exc).__name__}: {exc}")
                raise
            kv.set("rendezvous", f"{endpoint.host}:{port}")
        addr, port_s = kv.get("rendezvous", "Horovod's rendezvous address").rsplit(":", 1)
        os.environ["HOROVOD_FUSION_THRESHOLD"] = str(fusion_threshold_bytes(cfg))
        try:
            init_horovod(self.rank, self.world_size, addr, int(port_s), hostnames[self.rank],
                         endpoint.timeout_s, hostnames=hostnames)
        except BaseException:
            self._stop_server()
            raise
        hvd = self._hvd
        if (hvd.rank(), hvd.size()) != (self.rank, self.world_size):  # init_horovod checks too
            got = (hvd.rank(), hvd.size())
            self.close()
            raise RendezvousError(f"Horovod reports rank {got[0]} of {got[1]}, expected rank "
                                  f"{self.rank} of {self.world_size}")
        log.info("rank %d/%d joined Horovod %s (attempt %d, %s, fusion %d B, compression %s, "
                 "backward_passes_per_step %d)", self.rank, self.world_size, horovod_version(),
                 endpoint.attempt, "NCCL" if device.type == "cuda" else "Gloo",
                 fusion_threshold_bytes(cfg), cfg.compression, cfg.backward_passes_per_step)

    @staticmethod
    def _name(kind: str, tensor: torch.Tensor) -> str:
        # Stable per kind, dtype and size, so Horovod's response cache can reuse negotiations.
        return f"sparkml_dist.{kind}.{str(tensor.dtype).removeprefix('torch.')}.{tensor.numel()}"

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._hvd.allreduce_(tensor, op=self._hvd.Sum, name=self._name("sum", tensor))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._hvd.broadcast_(tensor, root_rank=src,
                                    name=self._name(f"broadcast{src}", tensor))

    def barrier(self) -> None:
        self._hvd.barrier()

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[nn.Module, HorovodOptimizer]:
        """Copy rank 0's model and optimizer state to every rank; average gradients with Horovod.

        The loop calls this after restoring a checkpoint, so the broadcast covers both a fresh
        start and a resume.
        """
        hvd = self._hvd
        self._broadcast_optimizer_state(optimizer)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        compression = hvd.Compression.fp16 if self.cfg.compression == "fp16" else \
            hvd.Compression.none
        dist_opt = hvd.DistributedOptimizer(
            optimizer, named_parameters=list(model.named_parameters()), compression=compression,
            backward_passes_per_step=self.cfg.backward_passes_per_step, op=hvd.Average)
        self._optimizer = HorovodOptimizer(optimizer, dist_opt, self.cfg.backward_passes_per_step)
        return model, self._optimizer

    def _broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """``hvd.broadcast_optimizer_state`` when there is state (a restored checkpoint).

        On a fresh optimizer Horovod would first create the state with a step on zero gradients,
        which counts an Adam step and applies weight decay: the run would then no longer match the
        torch backend. Fresh optimizers are identical on every rank anyway, so nothing is sent.
        """
        has = torch.tensor([1.0 if len(optimizer.state) else 0.0], dtype=torch.float64)
        with_state = int(self.all_reduce_sum(has).item())
        if with_state == 0:
            return
        if with_state != self.world_size:
            raise RuntimeError(f"{with_state} of {self.world_size} ranks restored optimizer state "
                               "from a checkpoint and the others did not; every rank must resume "
                               "from the same checkpoint")
        self._hvd.broadcast_optimizer_state(optimizer, root_rank=0)

    def comm_seconds(self) -> float:
        """Seconds the loop waited for gradient allreduces (``synchronize()``) since last call."""
        return self._optimizer.take_comm_seconds() if self._optimizer is not None else 0.0

    def _stop_server(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            stop_rendezvous_server(server)

    def close(self) -> None:
        if self._hvd.is_initialized():
            self._hvd.shutdown()
        self._stop_server()
