"""Pick the communicator for ``backend.name``."""

from __future__ import annotations

import torch

from sparkml_dist.comm.base import Communicator, Endpoint
from sparkml_dist.config import BackendConfig


def create_communicator(cfg: BackendConfig, endpoint: Endpoint, store: object,
                        device: torch.device) -> Communicator:
    """Join the group of this attempt with the configured backend."""
    if cfg.name == "horovod":
        from sparkml_dist.comm.horovod import HorovodCommunicator

        return HorovodCommunicator(endpoint, device, cfg, store)
    from sparkml_dist.comm.torch_dist import TorchCommunicator

    return TorchCommunicator(endpoint, device, store=store)
