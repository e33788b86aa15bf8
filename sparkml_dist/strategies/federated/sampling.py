"""Which clients take part in a round, and (for experiments) which of them drop out: pure
functions of (seed, round), so a resumed job samples exactly what the original would have.

Fixed-size sampling without replacement is McMahan et al. 2017's "random fraction C of
clients"; Poisson sampling (each client independently with rate q) is what DP-FedAvg's
amplification-by-sampling analysis assumes (McMahan et al. 2018). Numpy only.
"""

from __future__ import annotations

import numpy as np

_SAMPLE, _DROPOUT = 0x5A, 0xD0


def sample_clients(num_clients: int, per_round: int | None, mode: str, seed: int,
                   round_index: int) -> np.ndarray:
    """Sorted indices (into the sorted client list) of the clients sampled in ``round_index``."""
    if per_round is None or per_round >= num_clients and mode == "fixed":
        return np.arange(num_clients)
    rng = np.random.default_rng([seed, round_index, _SAMPLE])
    if mode == "poisson":
        return np.flatnonzero(rng.random(num_clients) < per_round / num_clients)
    return np.sort(rng.choice(num_clients, size=per_round, replace=False))


def dropouts(sampled: list[str], fraction: float, seed: int, round_index: int) -> set[str]:
    """The ``round(fraction * len(sampled))`` sampled clients whose updates never arrive."""
    k = int(round(fraction * len(sampled)))
    if k == 0:
        return set()
    rng = np.random.default_rng([seed, round_index, _DROPOUT])
    return {sampled[i] for i in rng.choice(len(sampled), size=k, replace=False)}
