"""Training curves as a PNG (matplotlib's object API: no pyplot state, no backend switch)."""

from __future__ import annotations

from pathlib import Path


def training_curves(series: dict[str, list[tuple[int, float]]], path: Path) -> None:
    """One panel per metric, x = optimizer step.

    Drawn on a :class:`matplotlib.figure.Figure` of its own, which renders with Agg without
    pyplot: the caller's backend (a notebook's inline one) and figures are left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(series), 3.4))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        steps, values = zip(*sorted(points))
        ax.plot(steps, values, marker="o" if len(steps) < 40 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
