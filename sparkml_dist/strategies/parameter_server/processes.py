"""The driver's server processes: start one per shard primary and one per replica (replica
first, so its primary can forward to it), wait for each to be ready (bounded), stop them all."""

from __future__ import annotations

import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sparkml_dist.strategies.parameter_server.client import Endpoint
from sparkml_dist.strategies.parameter_server.shard import ShardSpec

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """A server process did not come up."""


class ServerGroup:
    """Server processes of one job, on this (the driver's) host."""

    def __init__(self, host: str, secret: bytes, start_timeout_s: float = 120.0) -> None:
        self.host, self.secret, self.start_timeout_s = host, secret, start_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix="sparkml_dist-ps-"))
        self.cut_dir = self.dir / "cuts"
        """Where shards write their state at checkpoint cuts."""
        self.cut_dir.mkdir()
        self.procs: list[tuple[Endpoint, subprocess.Popen]] = []
        self.endpoints: list[list[Endpoint]] = []

    def start(self, specs: list[ShardSpec], values: list[list[torch.Tensor]], replicas: int,
              restores: list[dict[str, Any]] | None = None) -> list[list[Endpoint]]:
        """Start every shard (with ``replicas`` replicas each), from ``values`` or from a cut's
        per-shard state (``restores``); returns the endpoints per shard, primary first.
        Replicas start first (together), then the primaries (together)."""
        restore = restores or [None] * len(specs)
        try:
            reps: list[Endpoint | None] = [None] * len(specs)
            if replicas:
                launched = [self._launch(replace(s, role="replica", replica=None), v, r)
                            for s, v, r in zip(specs, values, restore)]
                reps = [self._ready(*x) for x in launched]
            launched = [self._launch(replace(s, role="primary",
                                             replica=(r.host, r.port) if r else None), v, c)
                        for s, v, r, c in zip(specs, values, reps, restore)]
            for x, r in zip(launched, reps):
                self.endpoints.append([self._ready(*x)] + ([r] if r else []))
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _launch(self, spec: ShardSpec, vals: list[torch.Tensor], restore: Any = None
                ) -> tuple[ShardSpec, subprocess.Popen, Path]:
        name = f"shard{spec.shard}-{spec.role}"
        path = self.dir / f"{name}.pt"
        torch.save({"spec": spec.to_dict(), "values": [v.detach().clone() for v in vals],
                    "host": self.host, "restore": restore}, path)
        log_path = self.dir / f"{name}.log"
        with open(log_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sparkml_dist.strategies.parameter_server.server",
                 str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                cwd=os.getcwd(), env={**os.environ, "OMP_NUM_THREADS": "1"})
        self.procs.append((Endpoint(spec.shard, spec.role, self.host, 0), proc))
        assert proc.stdin is not None
        proc.stdin.write(self.secret.hex().encode() + b"\n")
        proc.stdin.close()
        return spec, proc, log_path

    def _ready(self, spec: ShardSpec, proc: subprocess.Popen, log_path: Path) -> Endpoint:
        """Wait (bounded) for the ``READY <port>`` line of a launched server."""
        assert proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                proc.kill()
                raise ServerStartError(
                    f"parameter server shard {spec.shard} {spec.role} did not start within "
                    f"{self.start_timeout_s:.0f} s (exit code {proc.poll()}); its log "
                    f"{log_path} ends:\n{_tail(log_path)}")
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 0.5))
            if ready:
                line += os.read(proc.stdout.fileno(), 64)
        ep = Endpoint(spec.shard, spec.role, self.host, int(line.decode().split()[1]))
        self.procs = [(ep if p is proc else e, p) for e, p in self.procs]
        log.info("started %s (pid %d)", ep, proc.pid)
        return ep

    def describe(self) -> list[dict[str, Any]]:
        """Shard, role, address and pid of every process (for the run's tags)."""
        return [{"shard": ep.shard, "role": ep.role, "address": f"{ep.host}:{ep.port}",
                 "pid": p.pid} for ep, p in self.procs]

    def dead(self) -> list[str]:
        """Servers whose process has exited."""
        return [f"{ep} (exit code {p.returncode})" for ep, p in self.procs
                if p.poll() is not None]

    def stop(self, grace_s: float = 5.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
            if p.stdout is not None:
                p.stdout.close()
        shutil.rmtree(self.dir, ignore_errors=True)

def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"(unreadable: {exc})"
