"""``strategy.kind: data_parallel``: every rank holds the whole model; gradients are averaged by
ring allreduce (DDP or Horovod), optionally compressed on the wire. Settings:
:class:`sparkml_dist.config.DataParallelConfig`; the strategy:
:class:`sparkml_dist.strategies.data_parallel.strategy.DataParallel`."""
