"""Pipeline parallelism: the measured bubble against (p-1)/(m+p-1), and memory per rank against
the unsplit model's.

    python benchmarks/bench_pipeline.py [--stages 2 --micro 1 2 4 8 --schedules gpipe 1f1b]

Every run is the real rank loop (``train_rank``, ``strategy.kind: model_parallel``, torch's
``ScheduleGPipe`` / ``Schedule1F1B`` over gloo) on ``p`` local processes without Spark, through
``tests/ranks.py``'s ``run_ranks`` (one thread per process, so run it with at least ``p`` free
cores). Model: ``deep_mlp`` width ``--width`` with ``--depth`` residual blocks, split by
parameter count; digits (1,437 training rows), ``--batch`` rows per step, SGD with momentum.

1. ``bubble``: the library's ``pipeline/idle_share_stage<s>`` (1 - the stage's compute, i.e.
   forward and backward of its micro-batches plus its optimizer step, over the wall time of its
   whole training steps, waits included), averaged over the metric windows after the first
   (shape inference and warm-up) and over stages, against the ideal ``(p - 1) / (m + p - 1)``
   of equal stages with free communication (``(p - 1) / (v m + p - 1)`` for ``interleaved_1f1b``
   with ``--virtual`` chunks ``v`` per rank). Goal: within 5 points. On a machine whose cores
   other work shares, a stage descheduled mid-compute counts as busy and its peer as idle.
2. ``memory``: the library's ``memory/peak_bytes_max_rank`` (parameters, gradients, optimizer
   state, plus the peak of activations saved for backward, on the largest rank), against the
   same model unsplit on one rank with the same batch. Goal: at most ``1/p + 0.10`` of it.

Each configuration appends one JSON line to ``results/pipeline.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

from common import REPO, setup_env, write_result

sys.path.insert(0, str(REPO))  # tests.ranks: the rank loop on local gloo processes


def job(args: argparse.Namespace, stages: int, schedule: str, micro: int):
    """The run's config; ``interleaved_1f1b`` holds ``--virtual`` chunks per rank."""
    from sparkml_dist.config import JobConfig

    return JobConfig().replace(**{
        "model.factory": "sparkml_dist.models:deep_mlp",
        "model.kwargs": {"width": args.width, "depth": args.depth},
        "optimizer.name": "sgd", "optimizer.lr": 0.02, "optimizer.momentum": 0.9,
        "training.num_workers": stages, "training.batch_size": args.batch,
        "training.epochs": args.epochs, "training.seed": 1, "training.log_every_steps": 3,
        "backend.timeout_s": 300.0, "checkpoint.enabled": False, "data.val_fraction": 0.2,
        "strategy.kind": "model_parallel", "strategy.pipeline_stages": stages,
        "strategy.schedule": schedule, "strategy.micro_batches": micro,
        "strategy.virtual_stages": args.virtual if schedule == "interleaved_1f1b" else 1})


def run(args: argparse.Namespace, stages: int, schedule: str, micro: int) -> dict:
    from tests.ranks import digits, run_ranks

    cfg = job(args, stages, schedule, micro)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        results = run_ranks(cfg, digits(), d, timeout_s=1800.0)
    bad = {r: v for r, v in results.items() if v[0] != "ok"}
    if bad:
        raise RuntimeError(f"p={stages} {schedule} m={micro}: {bad}")
    rows = [m for _, m in results[0][1]["sink"] if "memory/peak_bytes_max_rank" in m][1:]
    out = {"wall_s": time.perf_counter() - t0, "windows": len(rows),
           "step_s": statistics.median(m["time/step_s"] for m in rows),
           "peak_bytes_max_rank": statistics.median(m["memory/peak_bytes_max_rank"]
                                                    for m in rows),
           "state_bytes_max_rank": statistics.median(m["memory/state_bytes_max_rank"]
                                                     for m in rows),
           "saved_bytes_max_rank": statistics.median(m["memory/saved_bytes_max_rank"]
                                                     for m in rows)}
    if stages > 1:
        out["idle_share_per_stage"] = [
            statistics.mean(m[f"pipeline/idle_share_stage{s}"] for m in rows)
            for s in range(stages)]
        out["idle_share"] = statistics.mean(out["idle_share_per_stage"])
        out["activation_bytes_per_step"] = rows[-1]["comm/activation_bytes_per_step"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, nargs="+", default=[2])
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--schedules", nargs="+", default=["gpipe", "1f1b", "interleaved_1f1b"])
    ap.add_argument("--virtual", type=int, default=2, help="chunks per rank, interleaved only")
    ap.add_argument("--no-unsplit", action="store_true",
                    help="reuse the last unsplit result in results/pipeline.jsonl")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    setup_env()
    from sparkml_dist.algo.partition import ideal_bubble

    setup = {"model": f"deep_mlp width {args.width} depth {args.depth}",
             "data": "digits (1437 training rows)", "batch_size": args.batch,
             "epochs": args.epochs, "transport": "gloo on loopback, 1 thread per rank",
             "memory": "parameters + gradients + optimizer state + peak activations saved for "
                       "backward (distinct storages), largest rank"}
    if args.no_unsplit:
        from common import RESULTS_DIR

        lines = (RESULTS_DIR / "pipeline.jsonl").read_text().splitlines()
        unsplit = [json.loads(x) for x in lines if json.loads(x).get("part") == "unsplit"][-1]
        if unsplit["setup"] != setup:
            raise SystemExit(f"the last unsplit result was measured with {unsplit['setup']}")
    else:
        unsplit = run(args, 1, "gpipe", 1)
        write_result("pipeline", {"part": "unsplit", "setup": setup, **unsplit})
    for p in args.stages:
        for schedule in args.schedules:
            for m in args.micro:
                if schedule == "1f1b" and m < p:
                    continue  # torch's 1F1B needs at least p micro-batches
                if schedule == "interleaved_1f1b" and m % max(1, m // p):
                    continue  # torch's interleaved rounds must divide the micro-batches
                v = args.virtual if schedule == "interleaved_1f1b" else 1
                r = run(args, p, schedule, m)
                ideal = ideal_bubble(p, m, v)
                mem_ratio = r["peak_bytes_max_rank"] / unsplit["peak_bytes_max_rank"]
                record = {"part": "pipeline", "setup": setup, "stages": p, "schedule": schedule,
                          "micro_batches": m, "virtual_stages": v, **r, "ideal_bubble": ideal,
                          "bubble_gap_points": 100 * (r["idle_share"] - ideal),
                          "bubble_goal": "within 5 points",
                          "bubble_ok": abs(r["idle_share"] - ideal) <= 0.05,
                          "memory_vs_unsplit": mem_ratio, "memory_goal": f"<= 1/p + 0.10 = "
                                                                         f"{1 / p + 0.1:.3f}",
                          "memory_ok": mem_ratio <= 1 / p + 0.10}
                path = write_result("pipeline", record)
                print(f"p={p} {schedule:5s} m={m}: idle {r['idle_share']:.3f} vs ideal "
                      f"{ideal:.3f} ({record['bubble_gap_points']:+.1f} pts), memory "
                      f"{mem_ratio:.3f} of unsplit, step {r['step_s'] * 1e3:.1f} ms -> {path}")


if __name__ == "__main__":
    main()
