"""Training curves as a PNG (matplotlib's object API: no pyplot state, no backend switch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PANEL_IN = (4.5, 3.4)
"""Width and height of one metric's panel, inches."""
MARGINS_IN = {"left": 0.75, "right": 0.15, "bottom": 0.5, "top": 0.35, "between": 0.85}
"""Room around the panels, inches: tick labels (ScalarFormatter keeps them to a few characters,
moving a common offset or exponent above the axis), the x label and the titles."""


def curves_figure(series: dict[str, list[tuple[int, float]]]) -> Any:
    """One panel per metric, x = optimizer step, on a :class:`matplotlib.figure.Figure` of its
    own (Agg, without pyplot: the caller's backend, e.g. a notebook's inline one, and its
    figures are left alone).

    The margins are fixed in inches rather than found by ``tight_layout``, which renders the
    whole figure once more to measure it (about half the cost of drawing the curves)."""
    from matplotlib.figure import Figure

    n = len(series)
    width, height = PANEL_IN[0] * n, PANEL_IN[1]
    m = MARGINS_IN
    fig = Figure(figsize=(width, height))
    axes_w = (width - m["left"] - m["right"] - m["between"] * (n - 1)) / n
    fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width,
                        bottom=m["bottom"] / height, top=1 - m["top"] / height,
                        wspace=m["between"] / axes_w)
    axes = fig.subplots(1, n, squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o" if len(steps) < 40 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return fig


def training_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """Write :func:`curves_figure` of ``series`` to ``path`` as a PNG."""
    curves_figure(series).savefig(path, dpi=110)
