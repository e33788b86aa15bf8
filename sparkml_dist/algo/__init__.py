"""Pure algorithms: torch/numpy only, explicit seeds, no Spark, MLflow, files or sockets."""
