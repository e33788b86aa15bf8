"""The library's rank loop at one rank against a plain PyTorch DDP loop, data on the device.

Issue 9's GPU measure, runnable without Spark, Java or MLflow (the GPU machine has none): a
one-rank group on a loopback TCPStore (NCCL on ``--device cuda``, gloo on ``cpu``) drives
:func:`sparkml_dist.training.loop.train_rank` with an in-memory shard, no checkpoints and a
null metric sink; the baseline is DDP on the same group with the whole dataset already on the
device, a permutation per epoch indexed on the device, and no host sync until the end.

Both run the same model, data, batch and optimizer (Adam). Steady state: each side runs 1 and
``1 + epochs`` epochs; the difference is the time of ``epochs`` epochs without start-up. Pairs are
run back to back ``--reps`` times; the ratio reported is the median of per-pair ratios of
samples/s (library / plain). Shapes: MLP 512-2048-2048-10 at batch 1024, 256-512-512-10 at 256,
64-128-10 at 64 (issue 9's three).

    python benchmarks/bench_gpu_loop.py --device cuda        # on a GPU machine
    python benchmarks/bench_gpu_loop.py --device cpu --quick # checks the script here
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # sparkml_dist from the checkout

from common import paired_ratios, summary, write_result  # noqa: E402

SHAPES = [((512, [2048, 2048]), 1024), ((256, [512, 512]), 256), ((64, [128]), 64)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group(device: torch.device):
    from sparkml_dist.comm.base import Endpoint
    from sparkml_dist.comm.torch_dist import TorchCommunicator

    port = _port()
    store = torch.distributed.TCPStore("127.0.0.1", port, 1, is_master=True,
                                       timeout=datetime.timedelta(seconds=60))
    ep = Endpoint(rank=0, world_size=1, host="127.0.0.1", port=port, attempt=0, timeout_s=60.0)
    return TorchCommunicator(ep, device, store)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def library_s(comm, device, x, y, hidden, batch, epochs) -> float:
    from sparkml_dist.config import JobConfig
    from sparkml_dist.data.shard_store import ShardStore, _Chunk
    from sparkml_dist.training.loop import NullSink, RankPlan, train_rank

    store = ShardStore([_Chunk(x, y, np.arange(len(y)))], x.shape[1])
    cfg = JobConfig().replace(**{
        "model.kwargs": {"hidden": hidden}, "training.num_workers": 1,
        "training.batch_size": batch, "training.epochs": epochs, "training.log_every_steps": 50,
        "data.val_fraction": 0.0, "checkpoint.enabled": False,
        "backend.device": device.type, "tracking.log_model": False})
    plan = RankPlan(in_features=x.shape[1], num_outputs=10, train_shard_sizes=(len(y),))
    _sync(device)
    t0 = time.perf_counter()
    train_rank(cfg, plan, comm, store, store, device, NullSink(), None)
    _sync(device)
    return time.perf_counter() - t0


def plain_s(comm, device, x, y, hidden, batch, epochs) -> float:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparkml_dist.models import mlp

    torch.manual_seed(0)
    net = mlp(x.shape[1], 10, hidden=hidden).to(device)
    model = DDP(net, device_ids=[device.index] if device.type == "cuda" else None,
                process_group=comm.process_group)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xd, yd = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
    steps = len(y) // batch
    loss_fn = torch.nn.CrossEntropyLoss()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(y), device=device)
        for s in range(steps):
            idx = perm[s * batch:(s + 1) * batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xd[idx]), yd[idx]).backward()
            opt.step()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script only")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.epochs, args.rows = 1, 1, 4096
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    comm = _group(device)
    rng = np.random.default_rng(0)
    try:
        for (width, hidden), batch in SHAPES:
            x = rng.normal(size=(args.rows, width)).astype(np.float32)
            y = rng.integers(0, 10, size=args.rows).astype(np.int64)
            samples = (args.rows // batch) * batch * args.epochs
            lib, ref = [], []
            for _ in range(args.reps):
                lib_t = (library_s(comm, device, x, y, hidden, batch, 1 + args.epochs)
                         - library_s(comm, device, x, y, hidden, batch, 1))
                ref_t = (plain_s(comm, device, x, y, hidden, batch, 1 + args.epochs)
                         - plain_s(comm, device, x, y, hidden, batch, 1))
                lib.append(samples / max(lib_t, 1e-9))
                ref.append(samples / max(ref_t, 1e-9))
            record = {
                "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else "cpu"),
                "shape": f"mlp {width}-{'-'.join(map(str, hidden))}-10", "batch": batch,
                "rows": args.rows, "epochs": args.epochs, "quick": args.quick,
                "library_samples_per_s": summary(lib), "plain_samples_per_s": summary(ref),
                "ratio_library_over_plain": paired_ratios(lib, ref),
                "goal": "ratio >= 0.95 on a GPU (issue 9)"}
            print(record["shape"], batch, record["ratio_library_over_plain"])
            if not args.quick:  # a quick run only checks that the script works
                write_result("gpu_loop", record)
    finally:
        comm.close()


if __name__ == "__main__":
    main()
