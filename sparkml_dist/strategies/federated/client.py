"""What one client does in one round, given its rows as numpy arrays: start from the global
model, train locally (plain, FedProx, or DP-SGD through Opacus), and return its update
``w_local - w_global`` with its sample count, clipped and noised when client-level DP asks.

Torch and numpy only (Opacus for sample-level DP); no Spark. Every random choice (data order,
dropout, DP noise) comes from generators seeded by (seed, round, client), so a retried Spark task
recomputes exactly the same update.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparkml_dist.config import OptimizerConfig
from sparkml_dist.strategies.federated import weights
from sparkml_dist.strategies.federated.fedprox import proximal_term
from sparkml_dist.strategies.federated.privacy import clip_update, gaussian_noise


def stream_seed(seed: int, round_index: int, client: str, purpose: str) -> int:
    """A 63-bit seed that depends only on its arguments (stable across processes)."""
    digest = hashlib.blake2b(f"{seed}/{round_index}/{client}/{purpose}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


@dataclass(frozen=True)
class SampleDP:
    """DP-SGD inside the client: per-row clipping to ``clip_norm`` and noise ``noise_multiplier``
    on Poisson-sampled batches of expected size ``batch_size``."""

    clip_norm: float
    noise_multiplier: float


@dataclass(frozen=True)
class LocalSpec:
    """Everything a client needs to train (picklable: it travels to executors)."""

    factory: str
    model_kwargs: dict[str, Any]
    in_features: int
    num_outputs: int
    task: str
    optimizer: OptimizerConfig
    local_epochs: int
    local_steps: int
    batch_size: int
    proximal_mu: float
    seed: int
    sample_dp: SampleDP | None = None
    clip_norm: float | None = None
    """Client-level DP: clip the update to this L2 norm."""
    local_noise: float = 0.0
    """Client-level local DP: the client adds N(0, (local_noise * clip_norm)^2) itself."""


@dataclass
class LocalResult:
    """One client's answer."""

    update: torch.Tensor
    """``w_local - w_global`` (after clipping and local noise, if configured), float32."""
    num_samples: int
    loss: float
    """Mean training loss over the local steps."""
    steps: int
    norm_before_clip: float


def local_steps(spec: LocalSpec, rows: int) -> int:
    """Optimizer steps a client with ``rows`` rows takes in one round."""
    if spec.local_steps:
        return spec.local_steps
    return spec.local_epochs * max(1, math.ceil(rows / spec.batch_size))


def _loss(task: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task == "classification":
        return torch.nn.functional.cross_entropy(out, y.long())
    return torch.nn.functional.mse_loss(out, y.float().reshape(out.shape))


def _batches(rows: int, steps: int, batch: int, gen: torch.Generator):
    """Index tensors: consecutive slices of per-epoch permutations (a batch never spans two)."""
    perm = torch.randperm(rows, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos >= rows:
            perm, pos = torch.randperm(rows, generator=gen), 0
        yield perm[pos:pos + batch]
        pos += batch


def train_local(spec: LocalSpec, global_vec: torch.Tensor, x: np.ndarray, y: np.ndarray,
                round_index: int, client: str) -> LocalResult:
    """Train one client for one round from ``global_vec`` on its rows ``x``, ``y``."""
    from sparkml_dist.models import build_model
    from sparkml_dist.training.optim import make_optimizer

    rows = int(x.shape[0])
    steps = local_steps(spec, rows)
    gen = torch.Generator().manual_seed(stream_seed(spec.seed, round_index, client, "data"))
    xt = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy of Arrow's buffer
    yt = torch.from_numpy(np.array(y))
    with torch.random.fork_rng(devices=[]):  # dropout draws from the global generator
        torch.manual_seed(stream_seed(spec.seed, round_index, client, "dropout"))
        model = build_model(spec.factory, spec.in_features, spec.num_outputs, spec.model_kwargs)
        weights.load_flat(model, global_vec)
        anchor = [p.detach().clone() for p in model.parameters()]
        model.train()
        if spec.sample_dp is None:
            opt = make_optimizer(spec.optimizer, model.parameters())
            losses = [_plain_step(model, opt, spec, xt[idx], yt[idx], anchor)
                      for idx in _batches(rows, steps, spec.batch_size, gen)]
        else:
            losses = _dp_sgd(model, spec, xt, yt, steps, gen,
                             stream_seed(spec.seed, round_index, client, "dp-sgd"))
        update = weights.flatten(model) - global_vec
    norm = float(torch.linalg.vector_norm(update))
    if spec.clip_norm is not None:
        update, norm = clip_update(update, spec.clip_norm)
        if spec.local_noise > 0:
            noise_gen = torch.Generator().manual_seed(
                stream_seed(spec.seed, round_index, client, "local-noise"))
            update = update + gaussian_noise(update.numel(), spec.local_noise * spec.clip_norm,
                                             noise_gen)
    return LocalResult(update=update, num_samples=rows,
                       loss=float(np.mean(losses)) if losses else float("nan"), steps=steps,
                       norm_before_clip=norm)


def _plain_step(model: torch.nn.Module, opt: torch.optim.Optimizer, spec: LocalSpec,
                xb: torch.Tensor, yb: torch.Tensor, anchor: list[torch.Tensor]) -> float:
    opt.zero_grad(set_to_none=True)
    loss = _loss(spec.task, model(xb), yb)
    total = loss + proximal_term(model.parameters(), anchor, spec.proximal_mu) \
        if spec.proximal_mu else loss
    total.backward()
    opt.step()
    return float(loss.detach())


def _dp_sgd(model: torch.nn.Module, spec: LocalSpec, xt: torch.Tensor, yt: torch.Tensor,
            steps: int, gen: torch.Generator, noise_seed: int) -> list[float]:
    """DP-SGD (Abadi et al. 2016) with Opacus' per-sample gradients and DPOptimizer on
    Poisson-sampled batches (rate batch_size / rows), as the accountant assumes."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    dp = spec.sample_dp
    assert dp is not None
    rows = int(xt.shape[0])
    rate = min(1.0, spec.batch_size / rows)
    gsm = GradSampleModule(model)
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=spec.optimizer.lr,
                                      momentum=spec.optimizer.momentum),
                      noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.clip_norm,
                      expected_batch_size=max(1, round(rate * rows)),
                      generator=torch.Generator().manual_seed(noise_seed))
    losses: list[float] = []
    for _ in range(steps):
        pick = torch.rand(rows, generator=gen) < rate
        opt.zero_grad(set_to_none=True)
        if not bool(pick.any()):  # an empty Poisson batch still takes a (noise-only) step
            for p in gsm.parameters():
                p.grad_sample = torch.zeros((1, *p.shape))
        else:
            loss = _loss(spec.task, gsm(xt[pick]), yt[pick])
            loss.backward()
            losses.append(float(loss.detach()))
        opt.step()
    gsm._close()  # removes Opacus' hooks from the model
    return losses
