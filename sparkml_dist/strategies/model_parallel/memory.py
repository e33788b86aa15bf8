"""What a rank's training holds in memory, measured from the tensors themselves (CPU has no
allocator statistics): the training state (parameters, gradients, optimizer state) and the peak
of the activations autograd saves for backward during one step.

:class:`SavedTensorMeter` counts, through ``torch.autograd.graph.saved_tensors_hooks``, the
distinct storages saved for backward and still alive (a storage saved twice counts once;
parameters are not activations and are left out), and keeps the peak. Buffers outside autograd
(a pipeline stage's receive buffers, the output it keeps until the backward) are not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class _Saved:
    """One saved tensor; releases its count when autograd frees it."""

    __slots__ = ("meter", "tensor", "key")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor, key: int) -> None:
        self.meter, self.tensor, self.key = meter, tensor, key

    def __del__(self) -> None:
        self.meter.release(self.key)


class SavedTensorMeter:
    """Context manager: peak bytes of live tensors saved for backward inside it."""

    def __init__(self, params: Iterable[torch.Tensor]) -> None:
        self.exclude = {_storage(p)[0] for p in params}
        self.live: dict[int, list[int]] = {}  # storage -> [references, bytes]
        self.current = 0
        self.peak = 0
        self._ctx: Any = None

    def _pack(self, t: torch.Tensor) -> Any:
        if t.device.type == "meta" or not hasattr(t, "untyped_storage"):
            return t
        key, nbytes = _storage(t)
        if key in self.exclude:
            return t
        entry = self.live.setdefault(key, [0, nbytes])
        if entry[0] == 0:
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        return _Saved(self, t, key)

    @staticmethod
    def _unpack(obj: Any) -> torch.Tensor:
        return obj.tensor if isinstance(obj, _Saved) else obj

    def release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.current -= entry[1]
            del self.live[key]

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def state_bytes(params: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's parameters, their gradients and the optimizer's state tensors
    (a DTensor counts its local shard)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in params:
        total += local(p).numel() * p.element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * p.grad.element_size()
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += local(v).numel() * v.element_size()
    return total
