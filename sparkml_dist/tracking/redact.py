"""Keep secrets out of MLflow params, artifacts and logs.

Follows Spark's convention (``spark.redaction.regex``, default
``(?i)secret|password|token|access[.]?key``): a setting whose *key* matches has its value
replaced, and a URI's password (``scheme://user:password@host``) is replaced wherever it appears.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

DEFAULT_REDACTION_REGEX = r"(?i)secret|password|token|access[.]?key"
"""Spark's default ``spark.redaction.regex``."""

REDACTED = "*********(redacted)"
"""What a redacted value reads as (Spark's own replacement text)."""

# user:password@ in a URI's authority; the password ends at the last '@' before the host.
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/:@\s]*:)(?P<pw>[^/\s]*)@")


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` replaced."""
    return _URI_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)


def redact(value: Any, regex: str = DEFAULT_REDACTION_REGEX) -> Any:
    """A copy of a nested dict/list config with secret-named scalars and URI passwords
    redacted; ``regex`` matches the keys to redact."""
    pattern = re.compile(regex)
    return _walk(value, pattern)


def _walk(value: Any, pattern: re.Pattern[str]) -> Any:
    if isinstance(value, Mapping):
        return {k: (REDACTED if pattern.search(str(k)) and not isinstance(v, (Mapping, list, tuple))
                    and v is not None else _walk(v, pattern))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_walk(v, pattern) for v in value]
    if isinstance(value, str):
        return redact_uri(value)
    return value
