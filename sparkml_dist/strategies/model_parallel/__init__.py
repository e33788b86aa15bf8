"""Model parallelism (``strategy.kind: model_parallel``): pipeline stages, tensor shards and a
data dimension over the barrier ranks. The strategy is
:class:`sparkml_dist.strategies.model_parallel.strategy.ModelParallel` (its module docstring has
the design); the settings are :mod:`sparkml_dist.strategies.model_parallel.config`; the planning
math is :mod:`sparkml_dist.algo.partition`. Importing this package imports nothing else."""
