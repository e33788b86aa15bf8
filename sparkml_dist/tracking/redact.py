"""Keep secrets out of MLflow params, artifacts and logs.

Follows Spark's convention (``spark.redaction.regex``, default
``(?i)secret|password|token|access[.]?key``): a setting whose *key* matches has its value
replaced, and a URI's password (``scheme://user:password@host``, or a query parameter named like
a secret: ``?password=...``) is replaced wherever it appears. :class:`Redactor` also removes the
literal secret values of one job's config (a read option's password) from free text such as an
error message or a rank's log tail.
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


# ?password=... / &access_key=... in a URI's query (JDBC URLs carry credentials this way).
_QUERY_SECRET = re.compile(r"(?P<head>[?&;](?:[^=&;\s/]*(?:secret|password|token|access[._-]?key)"
                           r"[^=&;\s/]*)=)(?P<value>[^&;\s]+)", re.IGNORECASE)


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` and every
    secret-named query parameter (``?password=...``) replaced."""
    text = _URI_PASSWORD.sub(lambda m: f"{m.group('head')}{REDACTED}@", text)
    return _QUERY_SECRET.sub(lambda m: f"{m.group('head')}{REDACTED}", text)


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


def secret_values(value: Any, regex: str = DEFAULT_REDACTION_REGEX) -> set[str]:
    """The literal secrets in a nested config: values of secret-named keys and URI passwords."""
    pattern = re.compile(regex)
    found: set[str] = set()

    def walk(v: Any, secret_key: bool) -> None:
        if isinstance(v, Mapping):
            for k, item in v.items():
                walk(item, bool(pattern.search(str(k))))
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item, secret_key)
        elif isinstance(v, str):
            if secret_key and v:
                found.add(v)
            found.update(m.group("pw") for m in _URI_PASSWORD.finditer(v) if m.group("pw"))
            found.update(m.group("value") for m in _QUERY_SECRET.finditer(v))
        elif secret_key and v is not None and not isinstance(v, bool):
            found.add(str(v))

    walk(value, False)
    return found


MIN_SECRET_CHARS = 3
"""Shorter secret values are not searched for in free text (URI passwords always are)."""


class Redactor:
    """Redacts URI passwords and one job's known secret values from any text or nested value.

    Built from the job's config (``Redactor(to_dict(cfg))``) on the driver, so that an error
    message, a log line or a failure record that quotes a read option's password, or a tracking
    URI with its credentials, never reaches MLflow or the logs.
    """

    def __init__(self, config: Any = None, regex: str = DEFAULT_REDACTION_REGEX) -> None:
        # Longest first, so a secret that contains another is replaced whole.
        # Values shorter than MIN_SECRET_CHARS are left: replacing every "1" in a text hides
        # more than it protects.
        found = secret_values(config, regex) if config is not None else set()
        self._secrets = sorted((s for s in found if len(s) >= MIN_SECRET_CHARS), key=len,
                               reverse=True)

    def text(self, text: str) -> str:
        """``text`` with URI passwords and this job's secrets replaced."""
        text = redact_uri(text)
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def value(self, value: Any) -> Any:
        """A copy of a nested dict/list with every string passed through :meth:`text`."""
        if isinstance(value, Mapping):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return self.text(value) if isinstance(value, str) else value
