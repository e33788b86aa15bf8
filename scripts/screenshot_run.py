#!/usr/bin/env python
"""Screenshot an MLflow run page with headless Chromium (for the docs).

Uses a running tracking server (``--tracking-uri http://...``) or starts ``mlflow server`` on a
free loopback port over a backend store (``--backend-store-uri``, default the demo's
``sqlite:///mlflow.db``) and stops it afterwards. The run defaults to the newest one.

    python scripts/screenshot_run.py --backend-store-uri sqlite:///mlflow.db \
        --out docs/img/mlflow_run.png

Needs a ``chromium`` binary (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, timeout_s: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 over ``backend_store_uri``; yields its URL."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="mlflow-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", backend_store_uri]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow server did not come up at {url} (log: {log.name}):\n"
                                 + Path(log.name).read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def newest_run(tracking_uri: str) -> tuple[str, str]:
    """(experiment id, run id) of the most recently started run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, order_by=["attribute.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no runs in {tracking_uri}; train one first (make demo).")
    return runs[0].info.experiment_id, runs[0].info.run_id


def screenshot(url: str, out: Path, width: int, height: int, budget_ms: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
               f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
               f"--screenshot={out.resolve()}", url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if done.returncode != 0 or not out.exists():
        raise SystemExit(f"chromium failed ({done.returncode}):\n{done.stderr[-2000:]}")


def shrink_png(path: Path, max_kb: int) -> None:
    """Re-encode with an adaptive 256-colour palette when the PNG is over ``max_kb``."""
    if path.stat().st_size <= max_kb * 1024:
        return
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", help="a running server (http://...); else one is started")
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db",
                   help="store for the started server (default: %(default)s)")
    p.add_argument("--run-id", help="run to show (default: the newest)")
    p.add_argument("--tab", default="", help="run page tab, e.g. model-metrics (default: overview)")
    p.add_argument("--out", type=Path, default=Path("docs/img/mlflow_run.png"))
    p.add_argument("--size", default="1400x1000", help="window WIDTHxHEIGHT (default: %(default)s)")
    p.add_argument("--budget-ms", type=int, default=15000, help="virtual time for the page to load")
    p.add_argument("--max-kb", type=int, default=300, help="palette-compress above this size")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    with contextlib.ExitStack() as stack:
        url = args.tracking_uri or stack.enter_context(mlflow_server(args.backend_store_uri))
        if args.run_id:
            from mlflow.tracking import MlflowClient

            run = MlflowClient(url).get_run(args.run_id)
            exp_id, run_id = run.info.experiment_id, run.info.run_id
        else:
            exp_id, run_id = newest_run(url)
        page = f"{url}/#/experiments/{exp_id}/runs/{run_id}" + (f"/{args.tab}" if args.tab else "")
        screenshot(page, args.out, width, height, args.budget_ms)
    shrink_png(args.out, args.max_kb)
    print(f"{args.out} ({args.out.stat().st_size // 1024} KiB): {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
