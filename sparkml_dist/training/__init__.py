"""Training: the per-rank loop, checkpoint state and optimizer/schedule construction."""
