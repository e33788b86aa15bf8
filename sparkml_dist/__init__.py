"""sparkml_dist: train PyTorch models on Spark data across barrier-mode ranks, tracked in MLflow."""

from sparkml_dist.api import FitResult, final_state, fit
from sparkml_dist.config import JobConfig, load_config

__all__ = ["FitResult", "JobConfig", "final_state", "fit", "load_config"]
__version__ = "0.1.0"
