"""Scaled int8 quantization of a gradient vector.

Each value is divided by ``scale = max|x| / 127`` and rounded to the nearest integer in
[-127, 127]; dequantization multiplies back, so the error per entry is at most ``scale / 2``.
This is the linear 8-bit scheme of Dettmers, "8-Bit Approximations for Parallelism in Deep
Learning" (ICLR 2016), with one scale per tensor. An int8 sum would overflow, so ranks exchange
the int8 payloads with all_gather and each rank dequantizes and averages locally: one byte per
entry plus one float32 scale per rank on the wire, against four bytes dense.
"""

from __future__ import annotations

import torch

LEVELS = 127


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: int8 values and the float32 scale (shape ``(1,)``) of a 1-D tensor."""
    amax = x.detach().abs().max() if x.numel() else torch.zeros((), dtype=x.dtype)
    scale = (amax.float() / LEVELS).reshape(1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x.float() / safe), -LEVELS, LEVELS).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 values of an int8 payload."""
    return q.float() * scale.float()


def mean_of_quantized(payloads: list[torch.Tensor], scales: list[torch.Tensor]) -> torch.Tensor:
    """Average of every rank's dequantized payload, summed in rank order (deterministic)."""
    total = dequantize(payloads[0], scales[0])
    for q, s in zip(payloads[1:], scales[1:]):
        total.add_(dequantize(q, s))
    return total.div_(len(payloads))


def wire_bytes(numel: int) -> int:
    """Bytes one rank contributes for a tensor of ``numel`` entries (payload + scale)."""
    return numel + 4
