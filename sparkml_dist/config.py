"""Typed job configuration.

One frozen, keyword-only dataclass per concern, validated in ``__post_init__``. YAML files in
``conf/`` map 1:1 onto :class:`JobConfig`; an unknown key or a value of the wrong type fails with
a :class:`ConfigError` that names the valid keys. ``--set a.b=c`` overrides use the same path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sparkml_dist.errors import ConfigError

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
    on_invalid: Literal["error", "drop"] = "error"
    """Rows with null/NaN features or labels: fail (default) or drop them, logging the count."""
    shard_memory_mb: float = 1024.0
    """A rank's shard above this many MiB of Arrow data spills to a memory-mapped IPC file."""
    spill_dir: str | None = None
    """Directory for spilled shards (default: the system temp dir of the executor)."""
    random_buckets: int = 64
    """Groups used to number rows in parallel for random sharding (more = more parallelism)."""

    def __post_init__(self) -> None:
        _check(0.0 <= self.val_fraction < 1.0,
               f"data.val_fraction must be in [0, 1); got {self.val_fraction}.")
        _check(self.shard_memory_mb > 0,
               f"data.shard_memory_mb must be > 0; got {self.shard_memory_mb}.")
        _check(self.random_buckets >= 1,
               f"data.random_buckets must be >= 1; got {self.random_buckets}.")
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

    def __post_init__(self) -> None:
        _check(self.lr > 0, f"optimizer.lr must be > 0; got {self.lr}.")
        _check(self.warmup_steps >= 0 and self.step_size_epochs >= 1,
               "optimizer.warmup_steps must be >= 0 and optimizer.step_size_epochs >= 1.")


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

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, f"training.num_workers must be >= 1; got {self.num_workers}.")
        _check(self.batch_size >= 1, f"training.batch_size must be >= 1; got {self.batch_size}.")
        _check(self.epochs >= 1, f"training.epochs must be >= 1; got {self.epochs}.")
        _check(self.log_every_steps >= 1, "training.log_every_steps must be >= 1.")


@dataclass(frozen=True, kw_only=True)
class BackendConfig:
    """How ranks talk: torch.distributed or Horovod, on CPU or GPU."""

    name: Literal["torch", "horovod"] = "torch"
    """``torch`` (DistributedDataParallel) or ``horovod`` (hvd.DistributedOptimizer)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """``cpu`` uses gloo; ``cuda`` uses NCCL with the GPU Spark assigned to each task."""
    timeout_s: float = 300.0
    """Bound on every collective; a stuck peer becomes an error naming the rank."""
    rendezvous_timeout_s: float = 120.0
    """Bound on the barrier rendezvous (allGather of rank 0's address and store connect)."""
    compression: Literal["none", "fp16"] = "none"
    """Gradient compression on the wire (Horovod ``Compression.fp16``, or the DDP fp16 hook)."""
    backward_passes_per_step: int = 1
    """Horovod: local gradient accumulation passes before an allreduce."""
    fusion_threshold_mb: float = 64.0
    """Horovod tensor fusion buffer (HOROVOD_FUSION_THRESHOLD)."""

    def __post_init__(self) -> None:
        _check(self.timeout_s > 0 and self.rendezvous_timeout_s > 0,
               "backend.timeout_s and backend.rendezvous_timeout_s must be > 0.")
        _check(self.backward_passes_per_step >= 1, "backend.backward_passes_per_step must be >= 1.")
        _check(self.name == "horovod" or self.backward_passes_per_step == 1,
               "backend.backward_passes_per_step applies to backend.name=horovod only.")


@dataclass(frozen=True, kw_only=True)
class FaultInjection:
    """TEST-ONLY: make ``rank`` exit hard (``os._exit``) at global ``step`` on ``attempt``."""

    rank: int
    """Rank that dies."""
    step: int
    """Global optimizer step (0-based) before which it dies."""
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

    def __post_init__(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps must be >= 0.")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1.")


@dataclass(frozen=True, kw_only=True)
class FaultToleranceConfig:
    """The driver's attempt loop."""

    max_restarts: int = 2
    """Relaunches after a failed attempt (0: fail on the first error)."""
    backoff_s: float = 2.0
    """Wait before a relaunch."""
    inject: FaultInjection | None = None
    """TEST-ONLY fault injection; leave unset in real jobs."""

    def __post_init__(self) -> None:
        _check(self.max_restarts >= 0 and self.backoff_s >= 0,
               "fault.max_restarts and fault.backoff_s must be >= 0.")


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


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """A whole training job."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def replace(self, **overrides: Any) -> JobConfig:
        """Return a copy with dotted-path overrides, e.g. ``replace(**{"training.epochs": 3})``."""
        return from_dict(apply_overrides(to_dict(self), overrides))

    def flat(self) -> dict[str, str]:
        """``{"training.epochs": "5", ...}``: the resolved config as MLflow params."""
        out: dict[str, str] = {}
        for section, values in to_dict(self).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = str(value)
        return out


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


def _build(cls: type, values: Mapping[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys"
                          f"{' under ' + path if path else ''} are: {', '.join(names)}.")
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
