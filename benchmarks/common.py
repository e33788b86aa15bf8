"""Shared by the benchmark scripts: environment, machine description, results files, statistics.

Every figure a benchmark reports is a median over repetitions run alternately with its baseline,
and a ratio against that baseline, because the machines these run on are shared and noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"


def setup_env() -> None:
    """Loopback Spark and the running interpreter on executors (only where not already set)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def spark_session(app: str, **conf: str):
    """A ``local[2]`` session: two task slots, one per rank."""
    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.master("local[2]").appName(app)
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "4g")
               .config("spark.pyspark.python", sys.executable))
    for k, v in conf.items():
        builder = builder.config(k, v)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing package is reported as None
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10,
                               check=False).stdout
        return out + ("+dirty" if dirty.strip() else "")
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": _version("torch"),
        "pyspark": _version("pyspark"),
        "mlflow": _version("mlflow"),
        "pyarrow": _version("pyarrow"),
        "git_commit": _git_commit(),
    }


def write_result(name: str, record: dict[str, Any]) -> Path:
    """Append ``record`` (plus time and machine) as one JSON line to ``results/<name>.jsonl``."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.jsonl"
    line = {"benchmark": name, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_info(), **record}
    with path.open("a") as f:
        f.write(json.dumps(line, default=float) + "\n")
    return path


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when the baseline is zero."""
    return float(a / b) if b else float("nan")


def paired_ratios(a: list[float], b: list[float]) -> dict[str, float]:
    """Median of the per-repetition ratios a[i]/b[i] (runs taken back to back), and its spread."""
    rs = sorted(ratio(x, y) for x, y in zip(a, b))
    return {"median": median(rs), "min": rs[0], "max": rs[-1], "n": len(rs)}


def summary(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of repeated measurements."""
    return {"median": median(values), "min": min(values), "max": max(values), "n": len(values)}
