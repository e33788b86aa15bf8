#!/usr/bin/env python3
"""Build the library's wheel and a packed Python environment for Spark executors.

    python scripts/pack_env.py [--horovod] [--python-prefix DIR] [--dist DIR]

Writes ``dist/sparkml_dist-<version>-py3-none-any.whl`` (every time; about 2 s) and
``dist/sparkml_dist-env.tar.gz``, a link to a venv-pack archive cached under
``$SPARKML_DIST_CACHE/envs`` (default ``~/.cache/sparkml_dist/envs``) and keyed by a hash of
requirements.lock, pyproject.toml, this script and the package's files: it is rebuilt only when
one of them changes. Ship it with ``spark-submit --archives
dist/sparkml_dist-env.tar.gz#environment --conf spark.pyspark.python=./environment/bin/python``.

The environment is a fresh venv holding the wheel and its dependencies at the versions in
requirements.lock, except PySpark: executors import the cluster's own PySpark (Spark puts its
``pyspark.zip`` first on their ``PYTHONPATH``), and its jars would add about 400 MB to every
executor's download. venv-pack links ``bin/python`` to the interpreter the venv was made from, so
executors need that Python at the same path (``--python-prefix`` rewrites it, e.g.
``/usr/local``). The last line printed is the archive's path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from; the cache key covers these and the files below.
SOURCES = ("pyproject.toml", "README.md", "sparkml_dist")
KEYED = ("requirements.lock", "scripts/pack_env.py")
ARCHIVE_LINK = "sparkml_dist-env.tar.gz"
NOT_SHIPPED = {"pyspark"}  # provided by the cluster's Spark
HOROVOD_RUNTIME = ("cloudpickle", "psutil", "pyyaml", "packaging")
KEEP_ARCHIVES = 2


def log(msg: str) -> None:
    print(f"[pack_env] {msg}", file=sys.stderr, flush=True)


def source_files() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES + KEYED:
        path = ROOT / name
        if path.is_dir():
            files.extend(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                         and p.suffix != ".pyc")
        else:
            files.append(path)
    return sorted(files)


def cache_key(horovod_wheel: Path | None) -> str:
    digest = hashlib.sha256(f"{sys.version_info[:2]}".encode())
    for path in source_files():
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    if horovod_wheel is not None:
        digest.update(horovod_wheel.name.encode() + horovod_wheel.read_bytes())
    return digest.hexdigest()[:16]


def run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"[pack_env] ERROR: {what} failed ({' '.join(cmd[:4])} ...):\n"
                 f"{(proc.stdout + proc.stderr)[-4000:]}")


def build_wheel(dist: Path) -> Path:
    """The wheel, built from a copy of exactly the package's sources (no stale build/ files)."""
    with tempfile.TemporaryDirectory(prefix="sparkml_dist-wheel-") as tmp:
        src = Path(tmp, "src")
        src.mkdir()
        for name in SOURCES:
            path = ROOT / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(path, src / name)
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(Path(tmp, "out")),
             str(src)], "building the wheel")
        (built,) = Path(tmp, "out").glob("sparkml_dist-*.whl")
        dist.mkdir(parents=True, exist_ok=True)
        for old in dist.glob("sparkml_dist-*.whl"):
            old.unlink()
        target = dist / built.name
        shutil.move(str(built), target)
    log(f"built {target}")
    return target


def dependencies() -> list[str]:
    """The wheel's requirements, less what the cluster provides."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    keep = []
    for dep in deps:
        name = dep.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        if name.lower() not in NOT_SHIPPED:
            keep.append(dep)
    return keep


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One build at a time per cache (tests and a `make dist` may race)."""
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_env(archive: Path, wheel: Path, horovod_wheel: Path | None, python_prefix: str | None,
              compress_level: int) -> dict:
    import venv_pack

    started = time.monotonic()
    for stale in archive.parent.glob("build-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=archive.parent) as tmp:
        env = Path(tmp, "env")
        run([sys.executable, "-m", "venv", str(env)], "creating the venv")
        pip = [str(env / "bin" / "python"), "-m", "pip", "install", "-q",
               "-c", str(ROOT / "requirements.lock")]
        log("installing the wheel and its dependencies at requirements.lock's versions")
        run(pip + ["--no-deps", str(wheel)], "installing the wheel")
        run(pip + dependencies(), "installing the dependencies")
        if horovod_wheel is not None:
            run(pip + ["--no-deps", str(horovod_wheel)], "installing Horovod")
            run(pip + list(HOROVOD_RUNTIME), "installing Horovod's runtime dependencies")
        check = "import torch, pyarrow, mlflow, sparkml_dist"
        if horovod_wheel is not None:
            check += ", horovod.torch"
        run([str(env / "bin" / "python"), "-c", check], "importing the packages in the new venv")
        installed_s = time.monotonic() - started
        log(f"packing with venv-pack (compress level {compress_level})")
        partial = Path(tmp, archive.name)
        venv_pack.pack(prefix=str(env), output=str(partial), python_prefix=python_prefix,
                       compress_level=compress_level)
        os.chmod(partial, 0o644)  # tempfile made it private
        os.replace(partial, archive)
    meta = {"archive": archive.name, "bytes": archive.stat().st_size,
            "install_s": round(installed_s, 1),
            "pack_s": round(time.monotonic() - started - installed_s, 1),
            "python": sys.version.split()[0], "horovod": horovod_wheel is not None,
            "python_prefix": python_prefix, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    archive.with_suffix("").with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prune(envs: Path, keep: Path) -> None:
    archives = sorted(envs.glob("sparkml_dist-env-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    for old in archives[:-KEEP_ARCHIVES]:
        if old != keep:
            old.unlink(missing_ok=True)
            old.with_suffix("").with_suffix(".json").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist", help="output folder")
    parser.add_argument("--horovod", action="store_true",
                        help="also ship the Horovod wheel built by scripts/build_horovod.sh")
    parser.add_argument("--python-prefix", help="where executors have this Python (absolute)")
    parser.add_argument("--compress-level", type=int, default=4, help="gzip level, 0-9")
    args = parser.parse_args(argv)
    cache = Path(os.environ.get("SPARKML_DIST_CACHE", Path.home() / ".cache" / "sparkml_dist"))
    envs = cache / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    horovod_wheel = None
    if args.horovod:
        tag = "cp%d%d" % sys.version_info[:2]
        found = sorted((cache / "wheels").glob(f"horovod-*-{tag}-{tag}-*.whl"))
        if not found:
            sys.exit(f"[pack_env] ERROR: no Horovod wheel for {tag} in {cache / 'wheels'}; build "
                     "it first with scripts/build_horovod.sh (make horovod)")
        horovod_wheel = found[-1]
    wheel = build_wheel(args.dist)
    key = cache_key(horovod_wheel)
    suffix = "-horovod" if horovod_wheel else ""
    prefix_tag = "" if not args.python_prefix else "-" + hashlib.sha256(
        args.python_prefix.encode()).hexdigest()[:6]
    archive = envs / f"sparkml_dist-env-cp{sys.version_info[0]}{sys.version_info[1]}-{key}" \
        f"{suffix}{prefix_tag}.tar.gz"
    with locked(envs / ".lock"):
        if archive.exists():
            log(f"cached: {archive} ({archive.stat().st_size / 2**20:.0f} MiB)")
        else:
            log(f"building {archive.name} (first time for this lock file and code: minutes)")
            meta = build_env(archive, wheel, horovod_wheel, args.python_prefix,
                             args.compress_level)
            log(f"packed {meta['bytes'] / 2**20:.0f} MiB: install {meta['install_s']} s, pack "
                f"{meta['pack_s']} s")
        prune(envs, archive)
    link = args.dist / ARCHIVE_LINK
    tmp_link = args.dist / f".{ARCHIVE_LINK}.{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(archive)
    os.replace(tmp_link, link)
    print(archive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
