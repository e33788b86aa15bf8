"""Checks :func:`sparkml_dist.fit` makes on the driver before launch, beyond what a config can
check about itself (``__post_init__``): the environment it runs in and the prepared data.

Each failure is a :class:`~sparkml_dist.errors.ConfigError` that names the setting, what was
given and what would be valid.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from sparkml_dist.config import JobConfig
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


def check_encryption(cfg: JobConfig, conf: Callable[[str], str | None]) -> None:
    """Refuse unencrypted collectives on a cluster that encrypts its own traffic, unless
    ``backend.allow_unencrypted`` is true (then warn). ``conf(key)`` reads a Spark setting."""
    on = [key for key in ENCRYPTION_CONFS if str(conf(key) or "false").strip().lower() == "true"]
    if not on:
        return
    if cfg.backend.allow_unencrypted:
        log.warning("%s is on, but backend.allow_unencrypted=true: the %s backend's collectives "
                    "(tensors, gradients) cross the network unencrypted", " and ".join(on),
                    cfg.backend.name)
        return
    raise ConfigError(f"this cluster encrypts its traffic ({', '.join(k + '=true' for k in on)}), "
                      f"but backend.name={cfg.backend.name} sends tensors between executors "
                      "unencrypted (gloo, NCCL and Horovod have no encryption). Set "
                      "backend.allow_unencrypted=true to train anyway on a network you trust.")
