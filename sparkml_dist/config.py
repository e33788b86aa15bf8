"""Typed job configuration.

One frozen, keyword-only dataclass per concern, validated in ``__post_init__``. YAML files in
``conf/`` map 1:1 onto :class:`JobConfig`; an unknown key or a value of the wrong type fails with
a :class:`ConfigError` that names the valid keys. ``--set a.b=c`` overrides use the same path.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparkml_dist.errors import ConfigError
from sparkml_dist.strategies.federated.config import FederatedConfig
from sparkml_dist.strategies.model_parallel.config import ModelParallelConfig

Task = Literal["classification", "regression"]
Partitioning = Literal["random", "stratified"]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training data comes from and how it is split and sharded."""

    source: str | None = None
    """Table name or file path; ignored when a DataFrame is passed to ``fit``."""
    format: Literal["parquet", "csv", "json", "orc", "table"] | None = None
    """Source format; inferred from the path's extension when unset, ``table`` for a name."""
    read_options: Mapping[str, str] = field(default_factory=dict)
    """Options for ``spark.read`` (e.g. ``{header: "true", inferSchema: "true"}`` for CSV)."""
    feature_cols: tuple[str, ...] = ()
    """Numeric feature columns, concatenated in this order."""
    features_col: str | None = None
    """One array or ML vector column of features (appended after ``feature_cols``)."""
    label_col: str = "label"
    """Label column: a class (any type) for classification, a number for regression."""
    task: Task = "classification"
    """``classification`` (cross-entropy, accuracy) or ``regression`` (MSE, RMSE)."""
    val_fraction: float = 0.2
    """Share of rows held out for validation (0 disables validation)."""
    split: Partitioning = "stratified"
    """Train/validation split: ``random`` or ``stratified`` by label (classification only)."""
    sharding: Partitioning = "stratified"
    """How training rows are dealt to ranks: ``random`` or ``stratified`` by label."""
    on_invalid: Literal["error", "drop", "fill"] = "error"
    """Rows with null/NaN features or labels: fail (default), drop them (logging the count), or
    ``fill``: replace a missing feature value by ``data.fill`` of its training values (stored
    with the run and in the logged model, which then scores rows with missing values); rows
    with a missing label are dropped."""
    fill: Literal["mean", "median", "zero"] = "mean"
    """Under ``on_invalid=fill``: the mean or (approximate) median of the feature's non-missing
    values in the training split, or 0."""
    categorical_cols: tuple[str, ...] = ()
    """String columns one-hot encoded after the numeric ``feature_cols``: one 0/1 feature per
    value seen in the training split (a null or unseen value is all zeros; a null counts as
    invalid unless ``on_invalid=fill``). The logged model then scores raw rows by column name."""
    max_categories: int = 20
    """A ``categorical_cols`` column with more distinct values fails before launch."""
    scale: Literal["none", "standard", "minmax"] = "none"
    """Feature scaling fitted by Spark on the training split only and stored with the run and in
    the logged model (which then scores raw rows): ``standard`` (z-score), ``minmax`` (to
    [0, 1]) or ``none``."""
    shard_memory_mb: float = 1024.0
    """A rank's shard above this many MiB of Arrow data spills to a memory-mapped IPC file."""
    spill_dir: str | None = None
    """Directory for spilled shards (default: the system temp dir of the executor)."""
    random_buckets: int = 64
    """Groups used to number rows in parallel for random sharding (more = more parallelism)."""
    allow_float_classes: bool = False
    """Under ``task=classification``, accept a float label with more than 1000 distinct values
    (refused by default: it is almost always a regression target)."""
    device_cache_share: float = 0.5
    """On GPU: keep a rank's training shard on the GPU when it fits this share of free GPU
    memory, and gather batches there (0 never does)."""
    prefetch: bool = True
    """On GPU, for shards not kept on it: gather the next batches in a background thread into
    pinned memory and copy them on a side stream while the current step runs."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0,
               f"data.val_fraction must be in [0, 1); got {self.val_fraction}.")
        _check(math.isfinite(self.shard_memory_mb) and self.shard_memory_mb > 0,
               f"data.shard_memory_mb must be finite and > 0; got {self.shard_memory_mb}.")
        _check(self.label_col not in self.feature_cols and self.label_col != self.features_col,
               f"data.label_col {self.label_col!r} is also a feature column (data.feature_cols="
               f"{list(self.feature_cols)}, data.features_col={self.features_col!r}); training "
               "on the label leaks it. Remove it from the features or pick another label_col.")
        _check(self.random_buckets >= 1,
               f"data.random_buckets must be >= 1; got {self.random_buckets}.")
        both = sorted(set(self.categorical_cols) & (set(self.feature_cols) | {self.label_col}))
        _check(not both, f"data.categorical_cols names {both}, also in data.feature_cols or "
               "data.label_col; list each column once.")
        _check(not self.categorical_cols or self.features_col is None,
               "data.categorical_cols needs the numeric features as data.feature_cols (the "
               "logged model takes raw columns by name), not data.features_col; got "
               f"data.features_col={self.features_col!r}.")
        _check(isinstance(self.max_categories, int) and self.max_categories >= 1,
               f"data.max_categories must be an integer >= 1; got {self.max_categories!r}.")
        _check(math.isfinite(self.device_cache_share) and 0 <= self.device_cache_share <= 1,
               f"data.device_cache_share must be in [0, 1]; got {self.device_cache_share}.")
        if self.task == "regression":
            _check(self.split == "random" and self.sharding == "random",
                   "stratified split/sharding needs classes; for task=regression set "
                   "data.split=random and data.sharding=random.")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The model, built on every rank by calling ``factory(**kwargs)``."""

    factory: str = "sparkml_dist.models:mlp"
    """Import path ``package.module:function`` of a callable returning a ``torch.nn.Module``.
    It receives ``in_features`` and ``num_outputs`` from the data plus ``kwargs``."""
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the factory."""

    def __post_init__(self) -> None:
        _check(":" in self.factory and all(self.factory.split(":", 1)),
               f"model.factory must look like 'package.module:function'; got {self.factory!r}.")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """Optimizer and learning-rate schedule (stepped once per optimizer step)."""

    name: Literal["sgd", "adam", "adamw"] = "adam"
    """Optimizer from ``torch.optim``."""
    lr: float = 1e-3
    """Base learning rate."""
    momentum: float = 0.0
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay."""
    schedule: Literal["constant", "cosine", "step"] = "constant"
    """Learning-rate schedule over all training steps."""
    step_size_epochs: int = 1
    """For ``step``: epochs between decays."""
    gamma: float = 0.1
    """For ``step``: decay factor."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    fused: bool = True
    """Use torch's fused kernel for the optimizer step (one kernel over all parameters instead
    of a Python loop of small ops per parameter; about half the optimizer's time on CPU) where
    the parameters allow it (plain dense floating-point tensors on CPU or CUDA; tensor
    parallelism's ``DTensor`` parameters keep the loop). Its results differ from the loop's by
    rounding only; set False for torch's default implementation."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.lr) and self.lr > 0,
               f"optimizer.lr must be finite and > 0; got {self.lr}.")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            _check(math.isfinite(value) and value >= 0,
                   f"optimizer.{name} must be finite and >= 0; got {value}.")
        _check(math.isfinite(self.gamma) and self.gamma > 0,
               f"optimizer.gamma (the step schedule's decay factor) must be finite and > 0, "
               f"usually in (0, 1]; got {self.gamma}.")
        _check(self.warmup_steps >= 0 and self.step_size_epochs >= 1,
               "optimizer.warmup_steps must be >= 0 and optimizer.step_size_epochs >= 1.")


@dataclass(frozen=True, kw_only=True)
class EarlyStoppingConfig:
    """``training.early_stopping``: stop when a validation metric stops improving (needs
    ``data.val_fraction > 0``). Every rank stops after the same epoch; the last checkpoint is
    marked final."""

    metric: Literal["val/loss", "val/accuracy", "val/rmse"] = "val/loss"
    """Validation metric watched after each epoch (``val/accuracy`` for classification,
    ``val/rmse`` for regression, ``val/loss`` for both)."""
    mode: Literal["auto", "min", "max"] = "auto"
    """``min``: lower is better; ``max``: higher is better; ``auto``: ``max`` for accuracy,
    ``min`` otherwise."""
    patience: int = 3
    """Epochs in a row without improvement after which training stops."""
    min_delta: float = 0.0
    """An epoch improves only when it beats the best value by more than this."""
    keep_best: bool = False
    """Log the model of the best epoch (not the last one) as the run's model."""

    def __post_init__(self) -> None:
        _check(isinstance(self.patience, int) and self.patience >= 1,
               f"training.early_stopping.patience must be an integer >= 1 (epochs); got "
               f"{self.patience!r}.")
        _check(math.isfinite(self.min_delta) and self.min_delta >= 0,
               f"training.early_stopping.min_delta must be finite and >= 0; got {self.min_delta}.")

    def resolved_mode(self) -> str:
        """``min`` or ``max``, with ``auto`` resolved from the metric."""
        if self.mode != "auto":
            return self.mode
        return "max" if self.metric == "val/accuracy" else "min"


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """The distributed training loop."""

    num_workers: int = 2
    """Ranks: one Spark barrier task each."""
    batch_size: int = 32
    """Per-rank batch size; the global batch is ``num_workers * batch_size``."""
    epochs: int = 5
    """Passes over the training data."""
    seed: int = 0
    """Seed for splits, shards, data order and model initialisation."""
    log_every_steps: int = 10
    """Rank 0 logs train metrics every this many steps."""
    early_stopping: EarlyStoppingConfig | None = None
    """Stop on a validation metric (None: always run every epoch)."""

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"training.num_workers must be >= 1; got {self.num_workers}.")
        _check(self.batch_size >= 1, f"training.batch_size must be >= 1; got {self.batch_size}.")
        _check(self.epochs >= 1, f"training.epochs must be >= 1; got {self.epochs}.")
        _check(self.log_every_steps >= 1, "training.log_every_steps must be >= 1.")
        _check(0 <= self.seed < 2**63,
               f"training.seed must be in [0, 2^63) (a torch/numpy seed); got {self.seed}.")


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """How ranks talk (transport only): torch.distributed or Horovod, on CPU or GPU.

    How ranks *cooperate* over that transport (gradient averaging, compression, ...) is the
    ``strategy:`` section's business.
    """

    name: Literal["torch", "horovod"] = "torch"
    """``torch`` (torch.distributed: gloo on CPU, NCCL on GPU) or ``horovod``."""
    device: Literal["cpu", "cuda"] = "cpu"
    """``cpu`` uses gloo; ``cuda`` uses NCCL with the GPU Spark assigned to each task."""
    timeout_s: float = 300.0
    """Bound on every collective; a stuck peer becomes an error naming the rank."""
    rendezvous_timeout_s: float = 120.0
    """Bound on the barrier rendezvous (learning rank 0's store address and connecting to it)."""
    rendezvous: Literal["auto", "driver", "barrier"] = "auto"
    """How ranks learn rank 0's store address. ``driver``: from a small sealed store the driver
    opens at ``spark.driver.host`` for each launch attempt, on a port the OS picks (executors
    must be able to connect to the driver on any port, as the parameter servers need too).
    ``barrier``: through ``BarrierTaskContext.allGather``, over Spark's own RPC; Spark's barrier
    calls wait in whole seconds, so this costs about 1 s a launch. ``auto``: ``driver`` under a
    local master (``local[N]``, ``local-cluster``: executors on the driver's host), ``barrier``
    on a cluster and under Spark Connect."""
    fusion_threshold_mb: float = 64.0
    """Horovod tensor fusion buffer (HOROVOD_FUSION_THRESHOLD)."""
    socket_ifname: str | None = None
    """Network interface(s) the collectives use on every executor, e.g. ``eth1`` (a comma list
    or NCCL's ``^``/``=`` prefixes pass through): sets ``GLOO_SOCKET_IFNAME`` and
    ``NCCL_SOCKET_IFNAME`` (and ``HOROVOD_GLOO_IFACE`` for Horovod) in each rank. Default: the
    interface the executor's host name resolves to."""
    allow_unencrypted: bool = False
    """gloo, NCCL and Horovod send tensors unencrypted. When Spark's ``spark.ssl.enabled`` or
    ``spark.network.crypto.enabled`` is on, the job is refused unless this is true (as PySpark's
    TorchDistributor does with ``pytorch.spark.distributor.ignoreSsl``)."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.timeout_s) and math.isfinite(self.rendezvous_timeout_s)
               and self.timeout_s > 0 and self.rendezvous_timeout_s > 0,
               "backend.timeout_s and backend.rendezvous_timeout_s must be finite and > 0; got "
               f"{self.timeout_s} and {self.rendezvous_timeout_s}.")
        _check(math.isfinite(self.fusion_threshold_mb) and self.fusion_threshold_mb >= 0,
               f"backend.fusion_threshold_mb must be finite and >= 0; got "
               f"{self.fusion_threshold_mb}.")
        _check(self.socket_ifname is None
               or re.fullmatch(r"[\^=]?[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*", self.socket_ifname)
               is not None,
               f"backend.socket_ifname must name network interfaces such as 'eth0' or "
               f"'eth0,eth1' (optionally prefixed by ^ or =); got {self.socket_ifname!r}.")


Compressor = Literal["none", "fp16", "bf16", "int8", "topk", "powersgd", "auto"]


@dataclass(frozen=True, kw_only=True)
class CompressionConfig:
    """Gradient compression on the wire, as a DDP communication hook (torch backend) or
    Horovod's compression (``fp16`` only)."""

    name: Compressor = "none"
    """``none``; ``fp16``/``bf16`` (half-precision cast); ``int8`` (per-bucket scaled, sent with
    all_gather); ``topk`` (largest-magnitude share with error feedback); ``powersgd`` (low-rank,
    torch's hook); ``auto`` (measures the link at start-up and uses ``auto_candidate`` only where
    it pays, else none)."""
    topk_ratio: float = 0.01
    """``topk``: share of each bucket's gradient entries sent per step, in (0, 1]."""
    error_feedback: bool = True
    """``topk``/``powersgd``: add what compression left out to the next step's gradient."""
    powersgd_rank: int = 2
    """``powersgd``: rank of the low-rank approximation (matrix_approximation_rank)."""
    powersgd_warm_start: bool = True
    """``powersgd``: reuse last step's factors as the start of the power iteration."""
    powersgd_start_step: int = 10
    """``powersgd``: plain allreduce for the first steps (>= 2: DDP rebuilds buckets at step 1)."""
    powersgd_min_compression_rate: float = 2.0
    """``powersgd``: compress a tensor only if this many times fewer numbers go on the wire."""
    auto_candidate: Literal["fp16", "bf16", "int8", "topk", "powersgd"] = "fp16"
    """``auto``: the compressor to use where the measured link makes it pay."""
    auto_min_speedup: float = 1.1
    """``auto``: use the candidate only if its estimated step communication is this much faster."""

    def __post_init__(self) -> None:
        _check(0 < self.topk_ratio <= 1,
               f"strategy.compression.topk_ratio must be in (0, 1]; got {self.topk_ratio}.")
        _check(self.powersgd_rank >= 1,
               f"strategy.compression.powersgd_rank must be >= 1; got {self.powersgd_rank}.")
        _check(self.powersgd_start_step >= 2,
               "strategy.compression.powersgd_start_step must be >= 2 (DDP rebuilds its gradient "
               f"buckets after the first step); got {self.powersgd_start_step}.")
        _check(math.isfinite(self.powersgd_min_compression_rate)
               and self.powersgd_min_compression_rate > 0,
               "strategy.compression.powersgd_min_compression_rate must be > 0.")
        _check(math.isfinite(self.auto_min_speedup) and self.auto_min_speedup >= 1.0,
               f"strategy.compression.auto_min_speedup must be >= 1; got {self.auto_min_speedup}.")


@dataclass(frozen=True, kw_only=True)
class DataParallelConfig:
    """``strategy.kind: data_parallel``: every rank holds the whole model and averages gradients
    with a ring allreduce each step (DDP on the torch backend, Horovod's DistributedOptimizer on
    the horovod backend). Resume is bitwise."""

    kind: Literal["data_parallel"] = "data_parallel"
    """Strategy discriminator."""
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    """Gradient compression on the wire."""
    backward_passes_per_step: int = 1
    """Horovod only: local gradient accumulation passes before an allreduce."""
    bucket_cap_mb: float = 25.0
    """DDP gradient bucket size (MiB)."""
    comm_timing_every_steps: int = 0
    """Time gradient communication on every N-th step (``time/comm_s``); 0 turns timing off, so
    uncompressed DDP runs torch's built-in allreduce with no Python hook at all."""

    def __post_init__(self) -> None:
        _check(self.backward_passes_per_step >= 1,
               "strategy.backward_passes_per_step must be >= 1.")
        _check(math.isfinite(self.bucket_cap_mb) and self.bucket_cap_mb > 0,
               f"strategy.bucket_cap_mb must be > 0; got {self.bucket_cap_mb}.")
        _check(self.comm_timing_every_steps >= 0,
               "strategy.comm_timing_every_steps must be >= 0 (0 turns timing off).")


@dataclass(frozen=True, kw_only=True)
class GossipConfig:
    """``strategy.kind: gossip``: decentralized training without a server; each rank takes local
    steps on its own data and averages its model with its neighbours' (D-PSGD or push-sum/SGP).
    Needs point-to-point (backend.name=torch). Resume is bitwise, except for
    ``async_push_sum`` (a consistent cut)."""

    kind: Literal["gossip"] = "gossip"
    """Strategy discriminator."""
    topology: Literal["ring", "torus", "exponential", "random"] = "ring"
    """Who talks to whom: ``ring``; ``torus`` (2-D grid with wrap-around); ``exponential``
    (peers at distance 2^k); ``random`` (one peer per rank per round, seeded by
    (training.seed, step))."""
    algorithm: Literal["dpsgd", "push_sum", "async_push_sum"] = "dpsgd"
    """``dpsgd`` (symmetric doubly stochastic averaging with neighbours), ``push_sum``
    (Stochastic Gradient Push: directed sends with a de-biasing weight), both synchronous, or
    ``async_push_sum`` (asynchronous gradient-push: every rank runs at its own pace and no rank
    waits for a slow peer between epoch ends; resume from a consistent cut, not bitwise; see
    :mod:`sparkml_dist.strategies.gossip_async`)."""
    gossip_every: int = 1
    """Average with the neighbours after every N-th local step (1: after each step)."""

    def __post_init__(self) -> None:
        _check(self.topology in ("ring", "torus", "exponential", "random"),
               f"strategy.topology must be one of ring, torus, exponential, random; got "
               f"{self.topology!r}.")
        _check(self.algorithm in ("dpsgd", "push_sum", "async_push_sum"),
               f"strategy.algorithm must be dpsgd, push_sum or async_push_sum; got "
               f"{self.algorithm!r}.")
        _check(isinstance(self.gossip_every, int) and self.gossip_every >= 1,
               f"strategy.gossip_every must be an integer >= 1; got {self.gossip_every!r}.")


@dataclass(frozen=True, kw_only=True)
class ParameterServerConfig:
    """``strategy.kind: parameter_server``: parameters sharded over server processes the driver
    starts; workers (ordinary Spark tasks, one per data shard) pull parameters, push gradients,
    and the servers apply the optimizer (``optimizer:``). See
    :mod:`sparkml_dist.strategies.parameter_server`."""

    kind: Literal["parameter_server"] = "parameter_server"
    """Strategy discriminator."""
    mode: Literal["sync", "async", "ssp"] = "sync"
    """``sync`` (bulk-synchronous: each step applies the mean of every worker's gradient),
    ``async`` (Downpour: each push applied on arrival, nobody waits) or ``ssp`` (stale
    synchronous: pushes applied on arrival, a worker at most ``staleness`` steps ahead of the
    slowest)."""
    staleness: int = 2
    """``ssp`` only: the bound s on how many steps a worker may run ahead of the slowest (0 is
    bulk-synchronous)."""
    num_servers: int = 1
    """Server shards the parameters are split over (balanced by size)."""
    replicas: int = 0
    """Replicas per shard: 0, or 1 (chain replication; on losing a primary the workers switch
    to its replica and training goes on)."""
    straggler_sleep_s: Mapping[int, float] = field(default_factory=dict)
    """BENCHMARKS ONLY: worker rank -> seconds it sleeps after every step."""

    def __post_init__(self) -> None:
        _check(self.mode in ("sync", "async", "ssp"),
               f"strategy.mode must be one of sync, async, ssp; got {self.mode!r}.")
        _check(isinstance(self.staleness, int) and self.staleness >= 0,
               f"strategy.staleness must be an integer >= 0; got {self.staleness!r}.")
        _check(isinstance(self.num_servers, int) and self.num_servers >= 1,
               f"strategy.num_servers must be an integer >= 1; got {self.num_servers!r}.")
        _check(self.replicas in (0, 1),
               f"strategy.replicas must be 0 or 1; got {self.replicas!r}.")
        for rank, sleep in dict(self.straggler_sleep_s).items():
            _check(isinstance(rank, int) and rank >= 0 and math.isfinite(float(sleep))
                   and float(sleep) >= 0,
                   "strategy.straggler_sleep_s maps worker ranks (int >= 0) to seconds >= 0; got "
                   f"{rank!r}: {sleep!r}.")


StrategyConfig = (DataParallelConfig | GossipConfig | FederatedConfig | ParameterServerConfig
                  | ModelParallelConfig)
"""The ``strategy:`` section: one frozen dataclass per kind, told apart by its ``kind`` field."""

STRATEGY_KINDS: dict[str, type] = {"data_parallel": DataParallelConfig, "gossip": GossipConfig,
                                   "federated": FederatedConfig,
                                   "parameter_server": ParameterServerConfig,
                                   "model_parallel": ModelParallelConfig}
"""``strategy.kind`` -> its config dataclass."""


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """TEST-ONLY: make ``rank`` exit hard (``os._exit``) at global ``step`` on ``attempt``."""

    rank: int
    """Rank that dies."""
    step: int
    """Global optimizer step (0-based) before which it dies (asynchronous push-sum: the first
    of the rank's own steps once the job has reached this step)."""
    attempt: int = 0
    """Launch attempt (0-based) on which it dies."""


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoints stored as artifacts of the job's MLflow run."""

    every_steps: int = 0
    """Also checkpoint every this many global steps (0: only at each epoch end)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    enabled: bool = True
    """Write checkpoints at all (resume needs them)."""
    upload_timeout_s: float = 900.0
    """How long a checkpoint's background upload may take before the next checkpoint (or the
    end of training) fails every rank with an error naming this setting. Uploads run while the
    ranks train, so a slow store never makes a collective time out."""

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps must be >= 0.")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1.")
        _check(math.isfinite(self.upload_timeout_s) and self.upload_timeout_s > 0,
               f"checkpoint.upload_timeout_s must be a finite number of seconds > 0; got "
               f"{self.upload_timeout_s!r}.")


@dataclass(frozen=True, kw_only=True)
class FaultToleranceConfig:
    """The driver's attempt loop."""

    max_restarts: int = 2
    """Relaunches after a failed attempt (0: fail on the first error)."""
    backoff_s: float = 2.0
    """Wait before a relaunch."""
    inject: FaultInjection | None = None
    """TEST-ONLY fault injection; leave unset in real jobs."""
    deadline_s: float | None = None
    """Wall-clock bound on training (every attempt and backoff together, from the first
    launch): past it the barrier stage's Spark jobs are cancelled and ``fit`` fails, with no
    relaunch. None: no deadline (each collective is still bounded by ``backend.timeout_s``)."""

    def __post_init__(self) -> None:
        _check(self.max_restarts >= 0 and math.isfinite(self.backoff_s) and self.backoff_s >= 0,
               "fault.max_restarts must be >= 0 and fault.backoff_s finite and >= 0; got "
               f"{self.max_restarts} and {self.backoff_s}.")
        _check(self.deadline_s is None or (math.isfinite(self.deadline_s) and self.deadline_s > 0),
               f"fault.deadline_s must be unset or finite and > 0 (seconds); got {self.deadline_s}.")


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """MLflow tracking."""

    tracking_uri: str | None = None
    """MLflow tracking URI; default ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in cwd."""
    experiment: str = "sparkml_dist"
    """Experiment name (created if missing)."""
    run_name: str | None = None
    """Run name shown in the MLflow UI."""
    log_model: bool = True
    """Log the final model with ``mlflow.pytorch`` (signature and input example included)."""
    registered_model_name: str | None = None
    """Also register the logged model under this name in the model registry."""
    progress: bool = True
    """Show live progress on the driver (console, or a bar in notebooks)."""
    progress_interval_s: float = 2.0
    """How often the driver polls the run for progress."""
    system_metrics_interval_s: float | None = None
    """Log MLflow system metrics (CPU, memory, disk, network, GPU when ``nvidia-ml-py`` is
    installed) from every rank, each rank its own node (``system/rank_<r>/...``), sampled every
    this many seconds in a background thread of the rank. None: off."""
    shared_storage: bool = False
    """The tracking store's local path (SQLite file, ``file:`` URI) is on storage every node
    mounts at the same path: skip the pre-flight that refuses local stores under a non-local
    master."""

    def __post_init__(self) -> None:
        _check(math.isfinite(self.progress_interval_s) and self.progress_interval_s > 0,
               "tracking.progress_interval_s must be finite and > 0 (set tracking.progress=false "
               f"to turn progress off); got {self.progress_interval_s}.")
        si = self.system_metrics_interval_s
        _check(si is None or (math.isfinite(si) and si > 0),
               f"tracking.system_metrics_interval_s must be unset (off) or finite and > 0 "
               f"(seconds); got {si}.")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole training job."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    strategy: StrategyConfig = field(default_factory=DataParallelConfig)
    """How ranks cooperate; ``kind`` picks the strategy and the other keys are its settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check_early_stopping(self)
        if self.strategy.kind in ("federated", "parameter_server"):
            _check(self.data.scale == "none" and self.data.on_invalid != "fill"
                   and not self.data.categorical_cols,
                   f"data.scale={self.data.scale} / data.on_invalid={self.data.on_invalid}: "
                   f"feature scaling, the missing-value fill and data.categorical_cols are not "
                   f"supported with "
                   f"strategy.kind={self.strategy.kind} yet; preprocess the features before fit, "
                   "or use another strategy.")
        st = self.strategy
        if isinstance(st, DataParallelConfig) and st.backward_passes_per_step > 1:
            _check(self.backend.name == "horovod",
                   "strategy.backward_passes_per_step applies to backend.name=horovod only.")

    def replace(self, **overrides: Any) -> JobConfig:
        """Return a copy with dotted-path overrides, e.g. ``replace(**{"training.epochs": 3})``.

        Setting ``strategy.kind`` to another kind starts that strategy from its defaults."""
        values = to_dict(self)
        kind = overrides.get("strategy.kind")
        if kind is not None and kind != values["strategy"]["kind"]:
            values["strategy"] = {"kind": kind}
        return from_dict(apply_overrides(values, overrides))

    def flat(self) -> dict[str, str]:
        """``{"training.epochs": "5", "strategy.compression.name": "none", ...}``: the resolved
        config as MLflow params, nested sections flattened with dots."""
        out: dict[str, str] = {}

        def walk(prefix: str, node: Any, cls: Any) -> None:
            for key, value in node.items():
                sub = getattr(cls, key, None) if cls is not None else None
                if isinstance(value, dict) and dataclasses.is_dataclass(sub):
                    walk(f"{prefix}{key}.", value, sub)
                else:
                    out[f"{prefix}{key}"] = str(value)

        for section in dataclasses.fields(self):
            walk(f"{section.name}.", to_dict(getattr(self, section.name)),
                 getattr(self, section.name))
        return out


def _check_early_stopping(cfg: JobConfig) -> None:
    es = cfg.training.early_stopping
    if es is None:
        return
    _check(cfg.data.val_fraction > 0,
           "training.early_stopping watches a validation metric, but data.val_fraction is 0 (no "
           "validation split); set data.val_fraction > 0 or remove training.early_stopping.")
    valid = {"classification": ("val/loss", "val/accuracy"), "regression": ("val/loss", "val/rmse")}
    allowed = valid.get(cfg.data.task, ("val/loss",))
    _check(es.metric in allowed,
           f"training.early_stopping.metric {es.metric!r} is not reported for data.task "
           f"{cfg.data.task!r}; use one of {', '.join(allowed)}.")
    _check(cfg.checkpoint.enabled or not es.keep_best,
           "training.early_stopping.keep_best keeps the best epoch's model with the checkpoints, "
           "but checkpoint.enabled is false; enable checkpoints or set keep_best: false.")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(obj: Any) -> Any:
    """Plain ``dict``/``list`` form of a config (tuples become lists, mappings dicts)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Convert a YAML value to type ``tp`` or raise a ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if _is_kind_union(tp):
        return _coerce_kind(value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{path}: {value!r} matches none of {_type_name(tp)}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping of {tp.__name__} fields; got {value!r}.")
        return _build(tp, value, path)
    if origin is tuple or tp is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list; got {value!r}.")
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping; got {value!r}.")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false; got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number; got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer; got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string; got {value!r}.")
        return value
    raise AssertionError(f"unsupported config type {tp!r} at {path}")


def _is_kind_union(tp: Any) -> bool:
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) \
        else (tp,)
    return bool(args) and all(a in STRATEGY_KINDS.values() for a in args)


def _coerce_kind(value: Any, path: str) -> Any:
    """A strategy section: pick the dataclass by ``kind`` (default ``data_parallel``)."""
    if isinstance(value, tuple(STRATEGY_KINDS.values())):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}: expected a mapping with a 'kind' key; got {value!r}.")
    kind = value.get("kind", "data_parallel")
    if kind not in STRATEGY_KINDS:
        raise ConfigError(f"{path}.kind: {kind!r} is not one of "
                          f"{', '.join(map(repr, STRATEGY_KINDS))}.")
    return _build(STRATEGY_KINDS[kind], value, path)


# Keys that moved to another section, so an old config fails with the new place named.
_MOVED = {"backend.compression": "strategy.compression.name",
          "backend.backward_passes_per_step": "strategy.backward_passes_per_step"}


def _build(cls: type, values: Mapping[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{path}." if path else ""
        moved = _MOVED.get(f"{where}{unknown[0]}")
        hint = f" It moved: set {moved} instead." if moved else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys"
                          f"{' under ' + path if path else ''} are: {', '.join(names)}.{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def from_dict(values: Mapping[str, Any]) -> JobConfig:
    """Build a :class:`JobConfig` from nested dicts (e.g. parsed YAML), strictly."""
    return _build(JobConfig, values or {}, "")


def apply_overrides(values: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``"training.epochs"``) in a nested dict copy."""
    out = to_dict(values)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = out
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a section.")
            node = nxt
        node[parts[-1]] = value
    return out


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Parse ``["a.b=1", "c.d=[x, y]"]``; values are read as YAML scalars or lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.epochs=3.")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a YAML config (or defaults when ``path`` is None) and apply ``--set`` overrides."""
    return load_dataclass(JobConfig, path, overrides)


def load_dataclass(cls: type, path: str | Path | None = None,
                   overrides: list[str] | None = None) -> Any:
    """Build the config dataclass ``cls`` strictly from a YAML file plus ``--set`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found; pass a YAML file such as conf/digits.yaml.")
        loaded = yaml.safe_load(p.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping; got {type(loaded).__name__}.")
        values = loaded or {}
    return _build(cls, apply_overrides(values, parse_set(overrides or [])), "")
