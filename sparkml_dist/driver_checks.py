"""Checks :func:`sparkml_dist.fit` makes on the driver before launch, beyond what a config can
check about itself (``__post_init__``): the environment it runs in and the prepared data.

Each failure is a :class:`~sparkml_dist.errors.ConfigError` that names the setting, what was
given and what would be valid.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from sparkml_dist.config import DataConfig, JobConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.errors import ConfigError

log = logging.getLogger(__name__)

FAULT_INJECTION_ENV = "SPARKML_DIST_ALLOW_FAULT_INJECTION"
"""Set to ``1`` to allow ``fault.inject`` outside pytest (e.g. a fault-tolerance demo)."""

MAX_FLOAT_CLASSES = 1000
"""A classification label of floats with more distinct values than this is refused unless
``data.allow_float_classes`` is true: it is almost always a regression target."""


def fault_injection_allowed() -> bool:
    """True under pytest (``PYTEST_CURRENT_TEST``, inherited by subprocesses a test starts) or
    when :data:`FAULT_INJECTION_ENV` is ``1``."""
    return bool(os.environ.get("PYTEST_CURRENT_TEST")) or os.environ.get(FAULT_INJECTION_ENV) == "1"


def check_environment(cfg: JobConfig, master: str) -> None:
    """Settings that depend on where the job runs: ``fault.inject`` only in tests, and a
    ``data.spill_dir`` that exists and is writable (checked where it is visible: on the driver
    when the master is local; a cluster's executors check it when they spill)."""
    if cfg.fault.inject is not None and not fault_injection_allowed():
        raise ConfigError(f"fault.inject={cfg.fault.inject} makes a rank exit on purpose and is "
                          "for tests only; remove it from the config (or set "
                          f"{FAULT_INJECTION_ENV}=1 to run a fault-tolerance demo).")
    spill = cfg.data.spill_dir
    if spill is not None and master.startswith("local"):
        if not os.path.isdir(spill):
            raise ConfigError(f"data.spill_dir={spill!r} does not exist or is not a directory; "
                              "create it, or unset data.spill_dir to spill into the system temp "
                              f"dir ({tempfile.gettempdir()}).")
        if not os.access(spill, os.W_OK | os.X_OK):
            raise ConfigError(f"data.spill_dir={spill!r} is not writable by this user; pick a "
                              "writable directory or unset data.spill_dir.")


def check_prepared(cfg: JobConfig, train_shard_sizes: Sequence[int],
                   classes: Sequence[Any]) -> None:
    """The prepared data fits the job: every shard holds at least one batch, and a float
    classification label is not really a continuous target."""
    bs = cfg.training.batch_size
    smallest = min(train_shard_sizes) if train_shard_sizes else 0
    if smallest < bs:
        raise ConfigError(f"training.batch_size={bs} is larger than the smallest training shard "
                          f"({smallest} rows; shards: {list(train_shard_sizes)}), so that rank "
                          f"would repeat rows within a batch. Set training.batch_size <= "
                          f"{smallest}, or lower training.num_workers.")
    if cfg.data.task == "classification" and not cfg.data.allow_float_classes:
        floats = [c for c in classes if isinstance(c, float) and not float(c).is_integer()]
        if len(classes) > MAX_FLOAT_CLASSES and floats:
            raise ConfigError(
                f"data.label_col {cfg.data.label_col!r} is a float with {len(classes)} distinct "
                f"values (e.g. {floats[:3]}) under data.task=classification: it looks like a "
                "regression target. Set data.task=regression (with data.split=random and "
                "data.sharding=random), or data.allow_float_classes=true if every value is a "
                "class.")


ENCRYPTION_CONFS = ("spark.ssl.enabled", "spark.network.crypto.enabled")
"""Spark settings that say the cluster's traffic must be encrypted."""


def check_encryption(cfg: JobConfig, conf: Callable[[str], str | None],
                     traffic: tuple[str, str] | None = None) -> None:
    """Refuse unencrypted traffic on a cluster that encrypts its own, unless
    ``backend.allow_unencrypted`` is true (then warn). ``conf(key)`` reads a Spark setting.
    ``traffic`` is (what sends, what crosses the network) for the messages; default: the
    backend's collectives."""
    on = [key for key in ENCRYPTION_CONFS if str(conf(key) or "false").strip().lower() == "true"]
    if not on:
        return
    sender, crossing = traffic or (
        f"backend.name={cfg.backend.name} sends tensors between executors unencrypted (gloo, "
        "NCCL and Horovod have no encryption)",
        f"the {cfg.backend.name} backend's collectives (tensors, gradients) cross the network")
    if cfg.backend.allow_unencrypted:
        log.warning("%s is on, but backend.allow_unencrypted=true: %s unencrypted",
                    " and ".join(on), crossing)
        return
    raise ConfigError(f"this cluster encrypts its traffic ({', '.join(k + '=true' for k in on)}), "
                      f"but {sender}. Set backend.allow_unencrypted=true to train anyway on a "
                      "network you trust.")


# ---------------------------------------------------------------------------------------------
# Will each rank's shard fit in its Python worker?

WORKER_BASE_MB = 400.0
"""Resident memory of a rank's Python worker before any data (interpreter, torch, pyarrow,
mlflow: about 370 MiB measured on CPU torch), counted against the limits below."""
ROW_BYTES_KEPT = 16
"""Bytes per row that stay in memory when features spill: label (<= 8) and row number (8)."""
_MIB = 2**20


def rank_rows(rows: int, layout: DataLayout) -> list[int]:
    """Rows (training and validation) each rank of ``layout`` will hold: preparation deals rows
    evenly to the shards, so at most ``ceil(rows / num_shards)`` per shard."""
    per_shard = math.ceil(rows / layout.num_shards)
    return [per_shard * len(shards) for shards in layout.shards_of_rank]


def parse_size_mb(text: str | None) -> float | None:
    """A Spark size setting (``512m``, ``2g``, ``1024`` = MiB) in MiB, or None when unset."""
    if text is None or not str(text).strip():
        return None
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)b?\s*", str(text).lower())
    if not m:
        return None
    scale = {"k": 1 / 1024, "": 1.0, "m": 1.0, "g": 1024.0, "t": 1024.0**2}[m.group(2)]
    return float(m.group(1)) * scale


def _worker_slots(conf: Callable[[str], str | None]) -> int:
    """The number of parts PySpark divides ``spark.executor.pyspark.memory`` into: the executor's
    cores (``spark.executor.cores``, 1 when unset, local masters included), not its task slots;
    each Python worker's limit is the setting divided by that."""
    return max(1, int(conf("spark.executor.cores") or 1))


def available_memory_bytes() -> int | None:
    """This host's available memory (``MemAvailable`` of /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_shard_memory(data: DataConfig, rows: int, in_features: int, layout: DataLayout,
                       conf: Callable[[str], str | None], master: str, *,
                       memory_bytes: int | None = None, disk_bytes: int | None = None) -> None:
    """Before the data is sharded: fail, naming the setting to change, when a rank's shard
    cannot fit in its Python worker.

    A rank holds ``rows x in_features x 4`` bytes of features, up to ``data.shard_memory_mb`` in
    memory and the rest spilled to ``data.spill_dir``, plus :data:`ROW_BYTES_KEPT` a row and
    :data:`WORKER_BASE_MB`. Checked against ``spark.executor.pyspark.memory`` (PySpark limits
    each Python worker to the setting divided by ``spark.executor.cores``) where set, and under a local
    master against this host's available memory (``memory_bytes``, default read from the host)
    and the free disk where shards spill (``disk_bytes``, default measured there).
    """
    per_rank = rank_rows(rows, layout)
    budget = data.shard_memory_mb * _MIB
    features = [n * in_features * 4 for n in per_rank]
    held = [min(f, budget) + n * ROW_BYTES_KEPT for f, n in zip(features, per_rank)]
    spilled = [max(0.0, f - budget) for f in features]
    r = max(range(len(held)), key=held.__getitem__)
    shape = (f"rank {r} would hold {per_rank[r]} rows x {in_features} features x 4 bytes = "
             f"{features[r] / _MIB:.1f} MiB of features, {held[r] / _MIB:.1f} MiB of it in memory "
             f"(data.shard_memory_mb={data.shard_memory_mb:g}; the rest spills to disk)")
    keep_mb = per_rank[r] * ROW_BYTES_KEPT / _MIB
    pyspark_mb = parse_size_mb(conf("spark.executor.pyspark.memory"))
    if pyspark_mb is not None:
        slots = _worker_slots(conf)
        limit_mb = pyspark_mb / slots
        need_mb = held[r] / _MIB + WORKER_BASE_MB
        if need_mb > limit_mb:
            fit_mb = limit_mb - WORKER_BASE_MB - keep_mb
            lower = (f", or lower data.shard_memory_mb to {math.floor(fit_mb * 10) / 10:g} or "
                     "less so more of the shard spills to disk (data.spill_dir)"
                     if fit_mb >= 0.1 else "")
            raise ConfigError(
                f"{shape}, plus about {WORKER_BASE_MB:.0f} MiB for Python and torch: about "
                f"{need_mb:.0f} MiB, but spark.executor.pyspark.memory="
                f"{conf('spark.executor.pyspark.memory')} limits each Python worker to "
                f"{limit_mb:.0f} MiB (divided by spark.executor.cores={slots}). Raise "
                f"spark.executor.pyspark.memory to at least {math.ceil(need_mb * slots)}m{lower}.")
    if not master.startswith("local"):
        return  # the executors' memory and disks are not visible from here
    avail = available_memory_bytes() if memory_bytes is None else memory_bytes
    total = sum(held) + len(held) * WORKER_BASE_MB * _MIB
    if avail is not None and total > avail:
        fit_mb = (avail / len(held) - WORKER_BASE_MB * _MIB) / _MIB - keep_mb
        lower = (f"lower data.shard_memory_mb to {math.floor(fit_mb * 10) / 10:g} or less so the "
                 "rest of each shard spills to disk (data.spill_dir)" if fit_mb >= 0.1 else
                 "train on fewer rows or features")
        raise ConfigError(
            f"{shape}; the {len(held)} ranks on this host (spark.master={master}) would need "
            f"about {total / _MIB:.0f} MiB together, with {WORKER_BASE_MB:.0f} MiB each for "
            f"Python and torch, but {avail / _MIB:.0f} MiB is available. {lower[0].upper()}"
            f"{lower[1:]}, or free memory.")
    spill_total = sum(spilled)
    where = data.spill_dir or tempfile.gettempdir()
    if spill_total > 0:
        free = shutil.disk_usage(where).free if disk_bytes is None else disk_bytes
        if spill_total > free:
            raise ConfigError(
                f"{shape}; the ranks on this host would spill {spill_total / _MIB:.0f} MiB of "
                f"features to {where}, which has {free / _MIB:.0f} MiB free. Set data.spill_dir "
                "to a directory with more free space, or raise data.shard_memory_mb if memory "
                "allows.")
