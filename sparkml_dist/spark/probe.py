"""What an executor's Python can import, and whether it reaches the tracking server.

This module is sent to executors *by value* (see :func:`register_by_value`), so it must import
nothing but the standard library at module level: it has to run in an executor whose Python
lacks every package of this project, in order to say so. The driver runs the same functions to
get the versions executors are compared with.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# Imported on executors and compared with the driver: module name -> what to install.
REQUIRED = ("torch", "pyarrow", "mlflow", "sparkml_dist")
HOROVOD = "horovod.torch"


def code_hash(package_dir: str | Path) -> str:
    """sha256 of a package's ``.py`` files (relative paths and bytes, sorted): two installs of
    the same version number with different code hash differently."""
    root = Path(package_dir)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def module_versions(modules: tuple[str, ...]) -> dict[str, dict[str, str | None]]:
    """``{module: {"version": ..., "error": ...}}`` for each module this Python can (or cannot)
    import; ``sparkml_dist`` also reports its ``code`` hash."""
    out: dict[str, dict[str, str | None]] = {}
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - any import failure is the finding
            out[name] = {"version": None, "error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        top = sys.modules[name.split(".")[0]]
        entry: dict[str, str | None] = {"version": str(getattr(top, "__version__", "unknown")),
                                        "error": None}
        if name == "sparkml_dist":
            entry["code"] = code_hash(Path(mod.__file__).parent)
        out[name] = entry
    return out


def reach(tracking_uri: str, timeout_s: float = 5.0) -> str | None:
    """None when an HTTP(S) tracking server answers (any HTTP status counts: the server is
    there), else why not. Other URIs (``databricks``, a database) are not probed."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"cannot reach the tracking server {tracking_uri}: {reason}"


def report(modules: tuple[str, ...], tracking_uri: str) -> dict[str, Any]:
    """Everything one executor tells the driver."""
    return {"host": socket.gethostname(), "workdir": os.getcwd(), "python": sys.executable,
            "python_version": "%d.%d.%d" % sys.version_info[:3],
            "modules": module_versions(modules), "tracking_error": reach(tracking_uri)}


def probe_partition(modules: tuple[str, ...], tracking_uri: str, _rows: Any) -> Any:
    """The executor side: one JSON report per task (never raises, so a task never fails and
    Spark has nothing to retry)."""
    import json

    try:
        yield json.dumps(report(modules, tracking_uri))
    except BaseException as exc:  # noqa: BLE001 - reported, not raised
        yield json.dumps({"host": socket.gethostname(), "workdir": os.getcwd(),
                          "python": sys.executable, "fatal": f"{type(exc).__name__}: {exc}"})


def probe_arrow(modules: tuple[str, ...], tracking_uri: str, batches: Any) -> Any:
    """The same report as an Arrow batch, for Spark Connect (which has no RDD API)."""
    import pyarrow as pa

    for _ in batches:
        pass
    rows = list(probe_partition(modules, tracking_uri, None))
    yield pa.RecordBatch.from_pydict({"report": rows})


def register_by_value() -> None:
    """Pickle this module's functions by value, so an executor without ``sparkml_dist`` can
    unpickle and run them."""
    from pyspark import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
