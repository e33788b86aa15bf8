"""The training-curve PNG: drawn without touching the caller's matplotlib state."""

from __future__ import annotations

import struct

import matplotlib
import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from sparkml_dist.tracking.plots import curves_figure, training_curves


def test_curves_png_leaves_the_callers_backend_and_figures_alone(tmp_path):
    # A notebook user's session: a backend of their own and a figure open in pyplot.
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mine = plt.figure()
        series = {"train/loss": [(s, 1.0 / (s + 1)) for s in range(50)],
                  "val/accuracy": [(25, 0.8), (50, 0.9)]}
        path = tmp_path / "curves.png"
        training_curves(series, path)
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number]
        assert plt.gcf() is mine
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
        assert (width, height) == (round(4.5 * 2 * 110), round(3.4 * 110))  # one panel a metric
    finally:
        plt.close("all")
        matplotlib.use(previous)


@pytest.mark.parametrize("panels", [1, 2, 4])
def test_every_label_lies_inside_the_figure_with_fixed_margins(panels):
    # Awkward values: tiny losses, large ones with an offset, long step counts, negatives.
    shapes = [[(s, 1e-5 / (s + 1)) for s in range(0, 200_000, 500)],
              [(s, 123456.0 + s) for s in range(300)],
              [(s, 0.9975 - 1e-4 * (s % 7)) for s in range(0, 5000, 10)],
              [(s, -3.25 + 0.01 * s) for s in range(30)]]
    series = {f"m{i}/loss": shapes[i] for i in range(panels)}
    fig = curves_figure(series)
    fig.set_dpi(110)  # as saved
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    box = fig.bbox
    texts = []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.get_offset_text(),
                  ax.xaxis.get_offset_text()]
        for axis in (ax.xaxis, ax.yaxis):  # the ticks drawn: those within the view limits
            lo, hi = sorted(axis.get_view_interval())
            texts += [t.label1 for t in axis.get_major_ticks()
                      if lo <= t.get_loc() <= hi and t.label1.get_visible()]
    drawn = [t for t in texts if t.get_text()]
    assert len(drawn) > 6 * panels
    for t in drawn:
        e = t.get_window_extent(renderer)
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, \
            f"{t.get_text()!r} at {e} leaves the figure {box}"
    # Panels do not overlap: each axes' y tick labels start right of the previous axes.
    for left, right in zip(fig.axes, fig.axes[1:]):
        first = min(t.get_window_extent(renderer).x0 for t in drawn
                    if t in [k.label1 for k in right.yaxis.get_major_ticks()])
        assert first > left.get_window_extent(renderer).x1
