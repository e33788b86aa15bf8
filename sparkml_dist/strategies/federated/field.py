"""Fixed-point quantization of real vectors into the prime field Z_p, p = 2**61 - 1.

Secure aggregation masks values with uniform field elements, so masked sums must be exact:
reals become integers ``round(x * 2**bits)`` represented modulo p (negatives as p - |v|), sums
are taken modulo p, and a sum is read back as signed (values above p/2 are negative). Exact as
long as the true integer sum stays within (-p/2, p/2), which :func:`quantize` checks for the
number of clients that will be summed.

(Bonawitz et al., CCS 2017, Sec. 3: inputs in Z_R, masks uniform in Z_R.) Numpy only.
"""

from __future__ import annotations

import numpy as np

P = (1 << 61) - 1
"""The Mersenne prime 2**61 - 1: sums of two elements fit an int64 without overflow."""
_HALF = P // 2


def quantize(x: np.ndarray, bits: int, summands: int) -> np.ndarray:
    """``round(x * 2**bits)`` as int64 field elements in [0, p).

    Raises ValueError when ``summands`` such values could wrap around the field; the message
    says how to fix it.
    """
    scaled = np.rint(np.asarray(x, dtype=np.float64) * float(1 << bits))
    limit = _HALF / max(1, summands)
    if scaled.size and float(np.max(np.abs(scaled))) >= limit:
        raise ValueError(
            f"a value of magnitude {float(np.max(np.abs(x))):.3g} times 2**{bits} summed over "
            f"{summands} clients could overflow the field (p = 2**61 - 1); lower "
            "strategy.secure_aggregation.quant_bits or clip the updates (strategy.privacy).")
    q = scaled.astype(np.int64)
    return np.where(q < 0, q + P, q).astype(np.int64)


def dequantize(q: np.ndarray, bits: int) -> np.ndarray:
    """Signed reals from field elements (e.g. an unmasked sum), as float64."""
    q = np.asarray(q, dtype=np.int64) % P
    signed = np.where(q > _HALF, q - P, q)
    return signed.astype(np.float64) / float(1 << bits)


def add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a + b) mod p`` for int64 arrays in [0, p)."""
    return (a + b) % P


def sub(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) mod p`` for int64 arrays in [0, p)."""
    return (a - b) % P
