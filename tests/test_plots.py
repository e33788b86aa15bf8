"""The training-curve PNG: drawn without touching the caller's matplotlib state."""

from __future__ import annotations

import struct

import matplotlib
import matplotlib.pyplot as plt

from sparkml_dist.tracking.plots import training_curves


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
