"""torch.distributed transport: gloo on CPU, NCCL on GPU.

Collectives, batched point-to-point, subgroups and a device mesh over one process group per
attempt. Every call is bounded by the group's timeout (``backend.timeout_s``).
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from sparkml_dist.comm.base import BACKEND_CAPABILITIES, Endpoint, ReduceOp

log = logging.getLogger(__name__)

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class TorchCommunicator:
    """:class:`~sparkml_dist.comm.base.Communicator` over torch.distributed."""

    name = "torch"
    capabilities = BACKEND_CAPABILITIES["torch"]

    def __init__(self, endpoint: Endpoint, device: torch.device,
                 store: dist.Store | None = None, *, group: Any = None,
                 ranks: Sequence[int] | None = None) -> None:
        self.device = device
        self.timeout_s = endpoint.timeout_s
        self._timeout = datetime.timedelta(seconds=endpoint.timeout_s)
        self.group = group  # None: the default (world) group
        self._owner = group is None
        if group is None:
            backend = "nccl" if device.type == "cuda" else "gloo"
            if store is None:
                store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size,
                                      is_master=False, timeout=self._timeout)
            self.store = dist.PrefixStore(f"sparkml_dist/attempt-{endpoint.attempt}", store)
            self._raw_store = store  # rank 0 hosts it: keep it alive as long as the group
            # On a GPU, naming the device creates the NCCL communicator now, within the
            # timeout, instead of lazily at whichever collective comes first (which torch
            # requires every rank to join when it is a point-to-point batch).
            eager = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, store=self.store, rank=endpoint.rank,
                                    world_size=endpoint.world_size, timeout=self._timeout,
                                    **eager)
            log.info("rank %d/%d joined the %s group (attempt %d)", endpoint.rank,
                     endpoint.world_size, backend, endpoint.attempt)
        else:
            self.store = store
        self.global_ranks = tuple(ranks) if ranks is not None else tuple(range(endpoint.world_size))
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._endpoint = endpoint

    @property
    def process_group(self) -> Any:
        """The torch process group (for DDP and torch's own parallel APIs)."""
        return self.group if self.group is not None else dist.group.WORLD

    def _on_device(self, tensor: torch.Tensor, op: Callable[[torch.Tensor], Any]) -> torch.Tensor:
        """Run ``op`` on ``tensor`` where the backend can (NCCL needs GPU tensors), in place."""
        if tensor.device == self.device or self.device.type == "cpu":
            op(tensor)
            return tensor
        moved = tensor.to(self.device)
        op(moved)
        tensor.copy_(moved)
        return tensor

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        if op == "avg":
            self._on_device(tensor, lambda t: dist.all_reduce(t, dist.ReduceOp.SUM,
                                                              group=self.group))
            return tensor.div_(self.world_size)
        return self._on_device(tensor, lambda t: dist.all_reduce(t, _OPS[op], group=self.group))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        src_global = self.global_ranks[src]
        return self._on_device(tensor, lambda t: dist.broadcast(t, src=src_global,
                                                                group=self.group))

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        t = tensor.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return [o.to(tensor.device) for o in out]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=self.global_ranks[src], group=self.group)
        return box[0]

    def exchange(self, sends: Mapping[int, torch.Tensor],
                 recvs: Mapping[int, torch.Tensor]) -> None:
        ops = [dist.P2POp(dist.isend, t, self.global_ranks[peer], group=self.group)
               for peer, t in sorted(sends.items())]
        ops += [dist.P2POp(dist.irecv, t, self.global_ranks[peer], group=self.group)
                for peer, t in sorted(recvs.items())]
        if not ops:
            return
        for work in dist.batch_isend_irecv(ops):
            if not work.wait(self._timeout):
                raise TimeoutError(f"rank {self.rank}: point-to-point exchange did not finish "
                                   f"within {self.timeout_s:.0f}s (backend.timeout_s)")

    def new_group(self, ranks: Sequence[int]) -> TorchCommunicator | None:
        members = [self.global_ranks[r] for r in ranks]
        group = dist.new_group(members, timeout=self._timeout)
        if dist.get_rank() not in members:
            return None
        return TorchCommunicator(self._endpoint, self.device, self.store, group=group,
                                 ranks=members)

    def device_mesh(self, shape: tuple[int, int], names: tuple[str, str]) -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        if shape[0] * shape[1] != self.world_size:
            raise ValueError(f"a {shape[0]}x{shape[1]} mesh needs {shape[0] * shape[1]} ranks; "
                             f"the job has {self.world_size}")
        return init_device_mesh(self.device.type, shape, mesh_dim_names=names)

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    def close(self) -> None:
        if self._owner and dist.is_initialized():
            dist.destroy_process_group()
