"""Demo data that needs no download: scikit-learn's bundled digits, written to Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def digits_table() -> pa.Table:
    """1,797 8x8 digit images: ``features`` (64 floats scaled to [0, 1]) and ``label`` (0-9)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return pa.table({
        "features": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64).cast(
            pa.list_(pa.float32())),
        "label": pa.array(d.target.astype(np.int64)),
    })


def write_digits_parquet(path: str | Path) -> Path:
    """Write :func:`digits_table` to ``path`` (a ``.parquet`` file) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(digits_table(), path)
    return path


if __name__ == "__main__":
    import sys

    out = write_digits_parquet(sys.argv[1] if len(sys.argv) > 1 else "data/digits.parquet")
    print(f"wrote {out}")
