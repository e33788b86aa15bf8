"""Background services that tests start (Spark master/workers, Spark Connect, mlflow server):
one way to pick a port, wait for readiness with a bound, and stop exactly what was started."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, the process group a service was started in."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group start_service created (start_new_session)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], what: str, log_path: Path,
               timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll ``ready()`` until it holds; raise with the log's tail if the process dies or time
    runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s:\n"
                               f"{log_path.read_text(errors='replace')[-3000:]}")
        time.sleep(poll_s)


def launch(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group with output to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


@contextlib.contextmanager
def service(cmd: list[str], log_path: Path, env: dict[str, str], cwd: Path,
            ready: Callable[[], bool], what: str, timeout_s: float) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` until the block ends; the block starts once ``ready()`` holds."""
    proc = launch(cmd, log_path, env, cwd)
    try:
        wait_ready(proc, ready, what, log_path, timeout_s)
        yield proc
    finally:
        stop_group(proc)


def listening(port: int) -> bool:
    """Something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
