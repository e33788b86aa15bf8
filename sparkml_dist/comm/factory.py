"""Pick the communicator for ``backend.name``."""

from __future__ import annotations

import os

import torch

from sparkml_dist.comm.base import Communicator, Endpoint
from sparkml_dist.config import BackendConfig


def socket_env(cfg: BackendConfig) -> dict[str, str]:
    """The interface variables for ``backend.socket_ifname`` (none when it is unset)."""
    if cfg.socket_ifname is None:
        return {}
    return {"GLOO_SOCKET_IFNAME": cfg.socket_ifname.lstrip("^="),
            "NCCL_SOCKET_IFNAME": cfg.socket_ifname}


def create_communicator(cfg: BackendConfig, endpoint: Endpoint, store: object,
                        device: torch.device) -> Communicator:
    """Join the group of this attempt with the configured backend (after setting
    :func:`socket_env` in this rank's environment, where gloo and NCCL read it)."""
    os.environ.update(socket_env(cfg))
    if cfg.name == "horovod":
        from sparkml_dist.comm.horovod import HorovodCommunicator

        return HorovodCommunicator(endpoint, device, cfg, store)
    from sparkml_dist.comm.torch_dist import TorchCommunicator

    return TorchCommunicator(endpoint, device, store=store)
