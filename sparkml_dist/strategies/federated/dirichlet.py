"""Label-skewed (non-IID) client splits: each class's rows are dealt to clients in proportions
drawn from a symmetric Dirichlet(alpha).

Yurochkin, Agarwal, Ghosh, Greenewald, Hoang, Khazaeni. "Bayesian Nonparametric Federated
Learning of Neural Networks", ICML 2019 (the per-class Dir(alpha) allocation), as popularised by
Hsu, Qi, Brown. "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019. Small alpha (0.1-0.5) gives clients dominated by few classes; large alpha
approaches IID.

Numpy only: this module computes the counts; :mod:`.partitioner` applies them to a DataFrame.
"""

from __future__ import annotations

import numpy as np


def _largest_remainder(total: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total * proportions``."""
    raw = proportions * total
    counts = np.floor(raw).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:short]] += 1
    return counts


def dirichlet_counts(class_counts: list[int], num_clients: int, alpha: float,
                     rng: np.random.Generator, min_rows: int = 1,
                     max_tries: int = 1000) -> np.ndarray:
    """A ``[classes, clients]`` matrix of row counts: row c splits class c's ``class_counts[c]``
    rows by proportions ~ Dir(alpha). Redrawn (up to ``max_tries``) until every client has at
    least ``min_rows`` rows."""
    if num_clients < 1 or alpha <= 0:
        raise ValueError(f"need num_clients >= 1 and alpha > 0; got {num_clients} and {alpha}")
    if sum(class_counts) < num_clients * min_rows:
        raise ValueError(f"{sum(class_counts)} rows cannot give {num_clients} clients "
                         f"{min_rows} rows each; use fewer clients")
    for _ in range(max_tries):
        props = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(class_counts))
        counts = np.stack([_largest_remainder(int(n), p) for n, p in zip(class_counts, props)])
        if counts.sum(axis=0).min() >= min_rows:
            return counts
    raise ValueError(f"no Dirichlet({alpha}) draw in {max_tries} gave each of {num_clients} "
                     f"clients {min_rows} rows; raise alpha or lower the number of clients")
