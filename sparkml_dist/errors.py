"""Exceptions users see. Each message says what was given, what was expected and how to fix it."""

from __future__ import annotations


class SparkMLDistError(Exception):
    """Base class of every error raised by sparkml_dist."""


class ConfigError(SparkMLDistError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


class DataError(SparkMLDistError, ValueError):
    """The input data cannot be trained on (missing column, nulls, too few rows, ...)."""


class ClusterError(SparkMLDistError, RuntimeError):
    """The Spark cluster cannot run the job as configured (too few slots, dynamic allocation...)."""


class RendezvousError(SparkMLDistError, RuntimeError):
    """Ranks failed to meet within the configured timeout."""


class TrainingFailed(SparkMLDistError, RuntimeError):
    """Every allowed attempt failed; the message names the rank, attempt and the error."""


class UserCodeError(SparkMLDistError, RuntimeError):
    """User code (model factory, forward pass) failed in a way a relaunch cannot fix."""


# Marker carried inside a task's exception text so the driver can tell a deterministic user error
# (stop now) from a lost worker or a broken collective (relaunch).
USER_ERROR_MARKER = "[sparkml_dist:user-error]"


class CheckpointError(SparkMLDistError, RuntimeError):
    """A checkpoint cannot be resumed: unreadable, unsafe, or written by other settings."""
