"""Where a sparkml_dist step spends its time beyond a plain DDP step: the ``torchrun`` baseline
loop of ``bench_training.py`` with one piece of the library's per-step work added at a time.

    python benchmarks/bench_step_overhead.py [--rows 20480 --epochs 3 --reps 5]

Variants (see ``ddp_loop.py``): ``base``, ``+seed`` (``torch.manual_seed`` per step), ``+hook``
(the library's timed comm hook), ``+shard`` (``ShardStore.gather`` over 10,000-row chunks),
``+mlflow`` (every 10 steps a loss allreduce and 9 metrics into a SQLite MLflow run on rank 0),
``+all``. They run alternately; each figure is a median over rounds of steady-state samples/s
(epochs 2..E), its ratio to ``base`` in the same round, and the added milliseconds per step,
``(1 / rate - 1 / base_rate) * samples_per_step``. Because wall time on a shared machine is
noisy, rank 0's process CPU time per step (all its threads, ``time.process_time``) is reported
too, with its difference to ``base`` in the same round: it is blind to time spent waiting.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from bench_training import make_data, run_torchrun
from common import paired_ratios, summary, write_result
from ddp_loop import EXTRAS

VARIANTS = {"base": (), **{f"+{e}": (e,) for e in EXTRAS}, "+all": EXTRAS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20480)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 256])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_step_overhead_"))
    try:
        _, npz = make_data(args.rows, tmp)
        rates: dict[str, list[float]] = {k: [] for k in VARIANTS}
        cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
        for rep in range(args.reps + 1):  # round 0 is a warm-up
            for name, extras in VARIANTS.items():
                r = run_torchrun(npz, args, tmp, extras)
                print(f"round {rep} {name}: {r['samples_per_s']:,.0f} samples/s, rank 0 CPU "
                      f"{r['cpu_ms_per_step']:.2f} ms/step", flush=True)
                if rep:
                    rates[name].append(r["samples_per_s"])
                    cpu[name].append(r["cpu_ms_per_step"])
        per_step = 2 * args.batch_size
        record = {
            "config": {"rows": args.rows, "epochs": args.epochs, "batch_size_per_rank":
                       args.batch_size, "hidden": args.hidden, "ranks": 2, "reps": args.reps},
            "samples_per_s": {k: summary(v) for k, v in rates.items()},
            "ratio_to_base": {k: paired_ratios(v, rates["base"]) for k, v in rates.items()},
            "added_ms_per_step": {k: summary([(1 / a - 1 / b) * per_step * 1e3
                                              for a, b in zip(v, rates["base"])])
                                  for k, v in rates.items()},
            "rank0_cpu_ms_per_step": {k: summary(v) for k, v in cpu.items()},
            "added_rank0_cpu_ms_per_step": {k: summary([a - b for a, b in zip(v, cpu["base"])])
                                            for k, v in cpu.items()},
        }
        path = write_result("step_overhead", record)
        for k in VARIANTS:
            print(f"{k}: {record['samples_per_s'][k]['median']:,.0f} samples/s, ratio "
                  f"{record['ratio_to_base'][k]['median']:.2f}, "
                  f"{record['added_ms_per_step'][k]['median']:+.2f} ms/step wall, "
                  f"{record['added_rank0_cpu_ms_per_step'][k]['median']:+.2f} ms/step rank 0 CPU")
        print(f"appended to {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
