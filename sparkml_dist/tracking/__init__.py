"""Tracking: the MLflow run, metrics, checkpoints as artifacts, plots and driver progress."""
