"""torch.distributed backend: gloo on CPU, NCCL on GPU, DistributedDataParallel."""

# No "from __future__ import annotations": DDP checks the hook's annotations at runtime.

import datetime
import logging
import threading
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparkml_dist.comm.base import Endpoint

log = logging.getLogger(__name__)


class _CommTimer:
    """DDP comm-hook state: allreduces each gradient bucket and accumulates its wall time.

    The time of a bucket runs from the hook's launch to the allreduce's completion, so with
    DDP's overlap it is the time communication was in flight, which may overlap backward compute.
    """

    def __init__(self, process_group: "dist.ProcessGroup | None", fp16: bool) -> None:
        self.process_group = process_group
        self.fp16 = fp16
        self._lock = threading.Lock()
        self.seconds = 0.0

    def add(self, dt: float) -> None:
        with self._lock:
            self.seconds += dt

    def take(self) -> float:
        with self._lock:
            s, self.seconds = self.seconds, 0.0
        return s


def _timed_allreduce_hook(state: _CommTimer, bucket: dist.GradBucket
                          ) -> torch.futures.Future[torch.Tensor]:
    """Average a bucket across ranks (optionally as fp16 on the wire), timing it."""
    t0 = time.perf_counter()
    world = dist.get_world_size(state.process_group)
    buf = bucket.buffer()
    wire = buf.to(torch.float16) if state.fp16 else buf
    wire.div_(world)
    fut = dist.all_reduce(wire, group=state.process_group, async_op=True).get_future()

    def done(f: "torch.futures.Future[list[torch.Tensor]]") -> torch.Tensor:
        state.add(time.perf_counter() - t0)
        out = f.value()[0]
        if state.fp16:
            buf.copy_(out)
            return buf
        return out

    return fut.then(done)


class TorchCommunicator:
    """:class:`~sparkml_dist.comm.base.Communicator` over torch.distributed."""

    name = "torch"

    def __init__(self, endpoint: Endpoint, device: torch.device, fp16: bool = False,
                 store: "dist.Store | None" = None) -> None:
        self.rank = endpoint.rank
        self.world_size = endpoint.world_size
        self.device = device
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=endpoint.timeout_s)
        if store is None:
            store = dist.TCPStore(endpoint.host, endpoint.port, endpoint.world_size,
                                  is_master=False, timeout=timeout)
        prefixed = dist.PrefixStore(f"sparkml_dist/attempt-{endpoint.attempt}", store)
        self._store = store
        dist.init_process_group(backend, store=prefixed, rank=endpoint.rank,
                                world_size=endpoint.world_size, timeout=timeout)
        self._timer = _CommTimer(None, fp16)
        log.info("rank %d/%d joined the %s group (attempt %d)", self.rank, self.world_size,
                 backend, endpoint.attempt)

    def _on_device(self, tensor: torch.Tensor, op) -> torch.Tensor:
        """Run ``op`` on ``tensor`` where the backend can (NCCL needs GPU tensors), in place."""
        if tensor.device == self.device or self.device.type == "cpu":
            op(tensor)
            return tensor
        moved = tensor.to(self.device)
        op(moved)
        tensor.copy_(moved)
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._on_device(tensor, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return self._on_device(tensor, lambda t: dist.broadcast(t, src=src))

    def barrier(self) -> None:
        dist.barrier()

    def wrap(self, model: nn.Module, optimizer: torch.optim.Optimizer
             ) -> tuple[nn.Module, torch.optim.Optimizer]:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DDP(model, device_ids=device_ids)  # broadcasts rank 0's parameters and buffers
        ddp.register_comm_hook(self._timer, _timed_allreduce_hook)
        return ddp, optimizer

    def comm_seconds(self) -> float:
        return self._timer.take()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
