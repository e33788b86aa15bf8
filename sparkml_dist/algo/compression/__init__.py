"""Gradient compression math (pure), wrapped as DDP hooks by
:mod:`sparkml_dist.strategies.data_parallel.hooks`.

- :mod:`.int8`: per-tensor scaled int8 quantization (Dettmers 2016).
- :mod:`.topk`: top-k sparsification with error feedback (Aji & Heafield 2017; Stich et al. 2018).

fp16/bf16 casts and PowerSGD (Vogels et al. 2019) come from torch's own
``torch.distributed.algorithms.ddp_comm_hooks``.
"""
