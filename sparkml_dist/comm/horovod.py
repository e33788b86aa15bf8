"""Horovod backend: gradient averaging with ``hvd.DistributedOptimizer`` over Gloo (CPU) or NCCL.

Ranks are already running inside a Spark barrier stage, so nothing launches them: the torch
``TCPStore`` of the barrier rendezvous (rank 0 is its master) serves as a small key/value store.
Every rank publishes its host name; rank 0 starts Horovod's rendezvous server for that host
layout and publishes its ``host:port``; every rank then joins with
:func:`~sparkml_dist.comm.horovod_gloo.init_horovod`. Keys are namespaced by the launch attempt.

Environment variables this module sets in the executor's Python worker before ``hvd.init()``
(Horovod reads them there): ``HOROVOD_FUSION_THRESHOLD`` (bytes, from
``backend.fusion_threshold_mb``), ``HOROVOD_STALL_CHECK_TIME_SECONDS`` and
``HOROVOD_STALL_SHUTDOWN_TIME_SECONDS`` (from ``backend.timeout_s``, :func:`horovod_tuning_env`)
plus the rendezvous variables of
:func:`~sparkml_dist.comm.horovod_gloo.horovod_env` (``HOROVOD_GLOO_TIMEOUT_SECONDS`` from
``backend.timeout_s`` among them).

Horovod is imported lazily; a missing or unsuitable build is reported as a deterministic error
pointing at ``scripts/build_horovod.sh``, so the driver does not relaunch for it.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import math
import os
import socket
from typing import Any

import torch

from sparkml_dist.comm.base import BACKEND_CAPABILITIES, Capability, Endpoint, ReduceOp, require
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
    """MLflow tags describing the Horovod transport of a job (the driver sets them on its run)."""
    return {
        "horovod.version": horovod_version() or "not installed on the driver",
        "horovod.controller": "gloo",
        "horovod.gradient_ops": "nccl" if cfg.device == "cuda" else "gloo",
        "horovod.fusion_threshold_bytes": str(fusion_threshold_bytes(cfg)),
    }


def fusion_threshold_bytes(cfg: BackendConfig) -> int:
    """``HOROVOD_FUSION_THRESHOLD`` for ``backend.fusion_threshold_mb`` (MiB)."""
    return int(cfg.fusion_threshold_mb * 2**20)


def horovod_tuning_env(cfg: BackendConfig) -> dict[str, str]:
    """``HOROVOD_FUSION_THRESHOLD`` plus the stall check from ``backend.timeout_s``: a rank that
    stops submitting tensors is reported after half the timeout and the job shut down after the
    whole of it (Horovod's defaults warn after 60 s and never shut down)."""
    timeout = max(2, math.ceil(cfg.timeout_s))
    return {"HOROVOD_FUSION_THRESHOLD": str(fusion_threshold_bytes(cfg)),
            "HOROVOD_STALL_CHECK_TIME_SECONDS": str(max(1, timeout // 2)),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(timeout)}


def gloo_iface(cfg: BackendConfig) -> str | None:
    """Horovod's Gloo interface (``HOROVOD_GLOO_IFACE``, one name) for ``backend.socket_ifname``:
    its first interface, or None (route detection) for an unset or excluding (``^``) value."""
    if cfg.socket_ifname is None or cfg.socket_ifname.startswith("^"):
        return None
    return cfg.socket_ifname.lstrip("=").split(",")[0]


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


class HorovodCommunicator:
    """:class:`~sparkml_dist.comm.base.Communicator` over Horovod, joined via the torch store."""

    name = "horovod"
    capabilities = BACKEND_CAPABILITIES["horovod"]

    def __init__(self, endpoint: Endpoint, device: torch.device, cfg: BackendConfig,
                 store: Any = None) -> None:
        self.rank = endpoint.rank
        self.world_size = endpoint.world_size
        self.device = device
        self.cfg = cfg
        self.timeout_s = endpoint.timeout_s
        self._hvd = import_horovod(device)
        self._server: Any = None
        if store is None:
            import torch.distributed as dist

            store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size,
                                  is_master=False,
                                  timeout=datetime.timedelta(seconds=endpoint.timeout_s))
        self._raw_store = store  # rank 0 hosts it: keep it alive as long as the group
        self.store = store
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
        os.environ.update(horovod_tuning_env(cfg))
        try:
            init_horovod(self.rank, self.world_size, addr, int(port_s), hostnames[self.rank],
                         endpoint.timeout_s, hostnames=hostnames, iface=gloo_iface(cfg))
        except BaseException:
            self._stop_server()
            raise
        hvd = self._hvd
        # Every rank has joined once all pass a barrier: Horovod's rendezvous server (an open HTTP
        # key/value store) is no longer needed, so it does not stay reachable during training.
        hvd.barrier()
        self._stop_server()
        if (hvd.rank(), hvd.size()) != (self.rank, self.world_size):  # init_horovod checks too
            got = (hvd.rank(), hvd.size())
            self.close()
            raise RendezvousError(f"Horovod reports rank {got[0]} of {got[1]}, expected rank "
                                  f"{self.rank} of {self.world_size}")
        log.info("rank %d/%d joined Horovod %s (attempt %d, %s, fusion %d B)", self.rank,
                 self.world_size, horovod_version(), endpoint.attempt,
                 "NCCL" if device.type == "cuda" else "Gloo", fusion_threshold_bytes(cfg))

    @staticmethod
    def _name(kind: str, tensor: torch.Tensor) -> str:
        # Stable per kind, dtype and size, so Horovod's response cache can reuse negotiations.
        return f"sparkml_dist.{kind}.{str(tensor.dtype).removeprefix('torch.')}.{tensor.numel()}"

    @property
    def hvd(self) -> Any:
        """The ``horovod.torch`` module this communicator initialised."""
        return self._hvd

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        hvd_op = {"sum": self._hvd.Sum, "avg": self._hvd.Average, "max": self._hvd.Max}[op]
        return self._hvd.allreduce_(tensor, op=hvd_op, name=self._name(op, tensor))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._hvd.broadcast_(tensor, root_rank=src,
                                    name=self._name(f"broadcast{src}", tensor))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        flat = self._hvd.allgather(tensor.reshape(1, -1), name=self._name("gather", tensor))
        return [row.reshape(tensor.shape) for row in flat]

    # Horovod matches collectives across ranks by name and, without one, names an object
    # collective after the object's type: ranks passing different types (rank 0 a tuple, the
    # others None) would wait for each other forever. Every rank counts its object collectives
    # the same way, so a sequence number is a name all ranks agree on.

    def _object_name(self, kind: str) -> str:
        self._objects = getattr(self, "_objects", 0) + 1
        return f"sparkml_dist.{kind}.{self._objects}"

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self._hvd.allgather_object(obj, name=self._object_name("gather_object"))

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return self._hvd.broadcast_object(obj, root_rank=src,
                                          name=self._object_name("broadcast_object"))

    def exchange(self, sends: Any, recvs: Any) -> None:
        require(self, Capability.P2P, "exchange()")

    def new_group(self, ranks: Any) -> None:
        require(self, Capability.SUBGROUPS, "new_group()")

    def device_mesh(self, shape: Any, names: Any) -> None:
        require(self, Capability.MESH, "device_mesh()")

    def barrier(self) -> None:
        self._hvd.barrier()

    def _stop_server(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            stop_rendezvous_server(server)

    def close(self) -> None:
        if self._hvd.is_initialized():
            self._hvd.shutdown()
        self._stop_server()
