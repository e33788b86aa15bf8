"""Communication: one small interface with torch.distributed and Horovod implementations."""

from sparkml_dist.comm.base import Communicator, Endpoint

__all__ = ["Communicator", "Endpoint"]
