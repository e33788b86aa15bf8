"""Model parallelism over the barrier ranks (``strategy.kind: model_parallel``).

Mesh: ``strategy.data_parallel x pipeline_stages x tensor_parallel`` ranks, ``rank = (d * P + s)
* T + t`` (:class:`sparkml_dist.algo.partition.Mesh`); one of ``P`` and ``T`` is 1. Replica ``d``
is the ``P`` (or ``T``) consecutive ranks ``d * P * T ...``.

Data: shard ``d`` is read by replica ``d``'s first rank (first stage, shard 0) and nobody else
(:meth:`ModelParallel.data_layout`); the other ranks read no shard, and the shared loop hands
them empty batches. Each step the reader sends what its peers need by point-to-point
(:meth:`Communicator.exchange`): to the last pipeline stage the batch's labels (``batch_size``
numbers); to the other tensor-parallel ranks the batch's features and labels (every shard
multiplies the same input). Steps per epoch come from the shard sizes as for every strategy.

Placement: every rank builds the whole model once from ``training.seed`` (so the weights start
as in one process), keeps its stage (pipeline: the ``nn.Sequential`` children of its stage, see
:mod:`.pipeline`) or its shards (tensor: torch's ``parallelize_module``, see :mod:`.tensor`),
and builds the job's optimizer and schedule over those parameters only.

Step: pipeline, ``ScheduleGPipe``, ``Schedule1F1B`` or ``ScheduleInterleaved1F1B`` (rank ``s``
holding chunks ``s, s + p, ...`` of ``p x strategy.virtual_stages``) from
``torch.distributed.pipelining`` over ``strategy.micro_batches`` micro-batches; tensor, one
forward/backward through the sharded module. Then, with ``data_parallel > 1``, each parameter's
gradient (shard) is averaged over the ranks holding the same stage and shard in the other replicas
(one all_reduce of the flat gradients per step), and the optimizer steps. The result equals one
process training the whole model on the concatenation of the replicas' batches.

Loss reported: the shared loop averages the per-rank loss over all ranks; a pipeline's loss
exists on its last stage only, which reports it multiplied by ``P`` (the others report 0), so
the average is the replicas' mean loss. Tensor-parallel ranks all hold the loss.

Validation and the final model: :meth:`ModelParallel.eval_module` assembles the whole model on
every rank (pipeline: the stages' state dicts of replica 0 by ``all_gather_object``; tensor:
``full_tensor`` of every shard) and validation runs it on the validation rows of the readers
(the other ranks hold none). The checkpoint's shared part holds that whole model, which the
driver logs as usual. So the assembled model must fit one worker's host memory at epoch ends and
checkpoints; training itself holds only the rank's part.

Checkpoint: each rank's part is its stage's (or shards') parameters, optimizer and schedule state;
the mesh is in the job fingerprint, so resuming on another mesh is refused by the loop with the
settings that differ. Resume guarantee: bitwise on the same mesh.

Metrics per window: ``pipeline/idle_share_stage<s>`` (1 - compute time / wall time of stage ``s``'s
training steps, averaged over replicas; compute is the forward and backward of every micro-batch
plus the optimizer step, wall time the whole step with its waits: for the labels, the schedule's
receives and sends, the gradient all_reduce), ``pipeline/idle_share`` (their mean),
``pipeline/ideal_bubble`` (``(p - 1) / (v m + p - 1)``, ``v`` the virtual stages),
``comm/activation_bytes_per_step`` (activations forward plus their gradients backward, summed over
all ranks) and ``comm/input_bytes_per_step`` (what readers send to their peers), and, measured on
the first step of each window (:mod:`.memory`), ``memory/state_bytes_max_rank`` (parameters,
gradients and optimizer state of the largest rank), ``memory/saved_bytes_max_rank`` (its peak of
activations saved for backward; not measured under tensor parallelism) and
``memory/peak_bytes_max_rank`` (their sum, the largest over ranks).

Backend: point-to-point, subgroups and a device mesh (backend.name=torch, gloo on CPU or NCCL on
GPU); Horovod is refused on the driver. What the ranks could not run is refused there too, before
anything launches, rather than left to fail or wait inside torch: schedules other than GPipe, 1F1B
and interleaved 1F1B (zero-bubble schedules are not offered), 1F1B with fewer micro-batches than
stages, interleaved 1F1B with micro-batches that are not a multiple of its rounds, micro-batches of
unequal size, tensor styles other than colwise and rowwise, pipeline and tensor parallelism
together, and a split or plan that does not fit the model.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import OrderedDict
from typing import Any, ClassVar

import torch
from torch import nn

from sparkml_dist.algo.partition import Mesh, ideal_bubble
from sparkml_dist.comm.base import Capability, Communicator
from sparkml_dist.config import JobConfig
from sparkml_dist.data.layout import DataLayout
from sparkml_dist.errors import CheckpointError, ConfigError
from sparkml_dist.models import build_model
from sparkml_dist.strategies.base import RankContext, Strategy, StrategyState
from sparkml_dist.strategies.data_parallel.strategy import build_replica, user_check
from sparkml_dist.strategies.model_parallel import tensor as tp
from sparkml_dist.strategies.model_parallel.config import ModelParallelConfig
from sparkml_dist.strategies.model_parallel.memory import SavedTensorMeter, state_bytes
from sparkml_dist.strategies.model_parallel.pipeline import (
    PipelineRunner, plan_stages, stage_module)
from sparkml_dist.training.objective import loss_fn, prepare_target
from sparkml_dist.training.optim import make_optimizer, make_scheduler

log = logging.getLogger(__name__)

PROBE_WIDTH = 16
"""Feature width the driver builds the model with to check the split when the data's width is
not known yet (named ``data.feature_cols`` give it)."""


def mesh_of(st: ModelParallelConfig) -> Mesh:
    """The job's rank mesh."""
    return Mesh(st.data_parallel, st.pipeline_stages, st.tensor_parallel)


def check_model(cfg: JobConfig, model: nn.Module) -> None:
    """The split (pipeline) or plan (tensor) fits ``model``; ConfigError naming the setting."""
    st: ModelParallelConfig = cfg.strategy
    if st.pipeline_stages > 1:
        plan_stages(model, st, cfg.model.factory)
    if st.tensor_parallel > 1:
        tp.check_plan(model, st.tensor_plan or tp.default_plan(model), st.tensor_parallel,
                      cfg.model.factory)


class ModelParallel(Strategy):
    """``strategy.kind: model_parallel``."""

    kind: ClassVar[str] = "model_parallel"
    resume_guarantee: ClassVar[str] = "bitwise"

    @classmethod
    def requirements(cls, cfg: JobConfig) -> dict[Capability, str]:
        st: ModelParallelConfig = cfg.strategy
        need: dict[Capability, str] = {}
        if st.pipeline_stages > 1:
            need[Capability.P2P] = f"strategy.pipeline_stages={st.pipeline_stages}"
            need[Capability.SUBGROUPS] = f"strategy.pipeline_stages={st.pipeline_stages}"
        if st.tensor_parallel > 1:
            need[Capability.MESH] = f"strategy.tensor_parallel={st.tensor_parallel}"
            need[Capability.P2P] = f"strategy.tensor_parallel={st.tensor_parallel}"
        if st.data_parallel > 1:
            need.setdefault(Capability.SUBGROUPS, f"strategy.data_parallel={st.data_parallel}")
        return need

    @classmethod
    def check(cls, cfg: JobConfig) -> None:
        """The mesh fits ``training.num_workers``, micro-batches fit the batch and the schedule,
        and the model can be split as asked (built once here with a probe width)."""
        st: ModelParallelConfig = cfg.strategy
        tc = cfg.training
        if st.world_size != tc.num_workers:
            raise ConfigError(
                f"strategy.data_parallel x pipeline_stages x tensor_parallel = "
                f"{mesh_of(st).describe()} = {st.world_size} ranks, but training.num_workers="
                f"{tc.num_workers}. Make the product equal training.num_workers.")
        if st.pipeline_stages > 1:
            if tc.batch_size % st.micro_batches:
                raise ConfigError(f"strategy.micro_batches={st.micro_batches} does not divide "
                                  f"training.batch_size={tc.batch_size}; pick a divisor of the "
                                  "batch size (every micro-batch has the same shape).")
            if st.schedule == "1f1b" and st.micro_batches < st.pipeline_stages:
                raise ConfigError(f"strategy.schedule=1f1b needs strategy.micro_batches >= "
                                  f"strategy.pipeline_stages ({st.pipeline_stages}); got "
                                  f"{st.micro_batches}.")
            rounds = max(1, st.micro_batches // st.pipeline_stages)
            if st.schedule == "interleaved_1f1b" and st.micro_batches % rounds:
                raise ConfigError(f"strategy.schedule=interleaved_1f1b needs strategy."
                                  f"micro_batches to be a multiple of its rounds (micro_batches "
                                  f"// pipeline_stages = {rounds}); got {st.micro_batches}. Use a "
                                  "multiple of strategy.pipeline_stages.")
        width = len(cfg.data.feature_cols) if cfg.data.feature_cols and not \
            cfg.data.features_col else PROBE_WIDTH
        try:
            model = build_model(cfg.model.factory, width, 2, cfg.model.kwargs)
        except Exception as exc:  # noqa: BLE001 - the ranks build it with the real width
            log.info("model_parallel: the split is checked on the ranks (the factory failed at "
                     "the probe width %d: %s)", width, exc)
            return
        check_model(cfg, model)

    @classmethod
    def data_layout(cls, cfg: JobConfig, world_size: int) -> DataLayout:
        """Shard ``d`` read by replica ``d``'s first rank only."""
        mesh = mesh_of(cfg.strategy)
        if mesh.size != world_size:
            raise ConfigError(f"strategy mesh {mesh.describe()} has {mesh.size} ranks; the job "
                              f"has {world_size}. Make the product equal training.num_workers.")
        return DataLayout(mesh.data, mesh.shards_of_rank())

    @classmethod
    def fingerprint_of(cls, cfg: JobConfig) -> dict[str, Any]:
        st: ModelParallelConfig = cfg.strategy
        return {"kind": cls.kind, "mesh (data x pipeline x tensor)": mesh_of(st).describe(),
                "schedule": st.schedule, "micro_batches": st.micro_batches,
                "virtual_stages": st.virtual_stages,
                "split_at": list(st.split_at), "tensor_plan": dict(st.tensor_plan)}

    @classmethod
    def run_tags(cls, cfg: JobConfig) -> dict[str, str]:
        st: ModelParallelConfig = cfg.strategy
        tags = {**super().run_tags(cfg), "sparkml_dist.model_parallel.mesh": mesh_of(st).describe()}
        if st.pipeline_stages > 1:
            tags["sparkml_dist.model_parallel.schedule"] = st.schedule
            tags["sparkml_dist.model_parallel.ideal_bubble"] = \
                f"{ideal_bubble(st.pipeline_stages, st.micro_batches, st.virtual_stages):.6f}"
        return tags

    # -- placement ---------------------------------------------------------------------------

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.cfg: ModelParallelConfig = ctx.cfg.strategy
        self.task = ctx.cfg.data.task
        self.mesh = mesh_of(self.cfg)
        if self.mesh.size != ctx.comm.world_size:
            raise ConfigError(f"strategy mesh {self.mesh.describe()} needs {self.mesh.size} "
                              f"ranks; this job has {ctx.comm.world_size}.")
        self.d, self.s, self.t = self.mesh.coords(ctx.comm.rank)
        self.batch = ctx.cfg.training.batch_size
        self.label_dtype = torch.int64 if self.task == "classification" else torch.float32
        full = build_replica(ctx)
        check_model(ctx.cfg, full)
        self._probe_net: nn.Module | None = full if self.is_reader else None
        self.pipe: PipelineRunner | None = None
        self.pipe_comm: Communicator | None = None
        if self.mesh.pipeline > 1:
            ranges = plan_stages(full, self.cfg, ctx.cfg.model.factory)
            mine = [self.s + k * self.mesh.pipeline for k in range(self.cfg.virtual_stages)]
            self._chunks = [(i, stage_module(full, ranges, i)) for i in mine]
            # all of this rank's layers under their own names: its parameters and checkpoint
            self.net: nn.Module = nn.Sequential(OrderedDict(
                (name, layer) for _, chunk in self._chunks
                for name, layer in chunk.named_children()))
            self._layers = [len(r) for r in ranges]
            for d in range(self.mesh.data):  # every rank creates every group, in one order
                g = ctx.comm.new_group(list(self.mesh.pipeline_ranks(d, 0)))
                if g is not None:
                    self.pipe_comm = g
        elif self.mesh.tensor > 1:
            dev_mesh = ctx.comm.device_mesh((self.mesh.data, self.mesh.tensor),
                                            ("data", "tensor"))
            if self._probe_net is not None:  # sharding works in place; probe an unsharded copy
                self._probe_net = copy.deepcopy(full)
            plan = self.cfg.tensor_plan or tp.default_plan(full)
            self.net = tp.parallelize(full, dev_mesh["tensor"], plan)
        else:
            self.net = full
        self.data_comm: Communicator | None = None
        if self.mesh.data > 1:
            for s in range(self.mesh.pipeline):
                for t in range(self.mesh.tensor):
                    g = ctx.comm.new_group(list(self.mesh.data_ranks(s, t)))
                    if g is not None:
                        self.data_comm = g
        self.params = list(self.net.parameters())
        self.optimizer = make_optimizer(ctx.cfg.optimizer, self.params)
        self.scheduler = make_scheduler(ctx.cfg.optimizer, self.optimizer, ctx.steps_per_epoch,
                                        ctx.total_steps)
        self.loss = loss_fn(self.task)
        self._assembled: nn.Module | None = None
        self._assembled_at = -1
        self._steps = 0
        self._input_bytes = 0
        self._measure = True  # measure memory on the first step of each metrics window
        self._memory: tuple[int, int] | None = None  # (state bytes, peak saved bytes)

    @property
    def is_reader(self) -> bool:
        """Whether this rank reads its replica's data shard."""
        return self.ctx.comm.rank == self.mesh.reader(self.d)

    def probe(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The whole model on a first batch, on the ranks that read data (before any
        collective); the pipeline stages are built from that same model."""
        if self._probe_net is not None and len(x):
            user_check(self._probe_net, x, y, self.task)
        self._probe_net = None

    def start(self) -> None:
        if self.mesh.pipeline > 1:
            assert self.pipe_comm is not None
            self.pipe = PipelineRunner(self._chunks, self.s, self.mesh.pipeline,
                                       self.pipe_comm.process_group, self.cfg, self.batch,
                                       self.task, self.ctx.device)
        log.info("model_parallel: rank %d is (replica %d, stage %d, shard %d) of a %s mesh%s",
                 self.ctx.comm.rank, self.d, self.s, self.t, self.mesh.describe(),
                 f"; stage layers {self._layers}, {self.cfg.schedule}, {self.cfg.micro_batches}"
                 " micro-batches" if self.mesh.pipeline > 1 else "")

    # -- the step ----------------------------------------------------------------------------

    def _inputs(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch as this rank needs it: the reader sends labels to the last stage, or
        features and labels to its tensor-parallel peers."""
        comm, mesh = self.ctx.comm, self.mesh
        reader = mesh.reader(self.d)
        if mesh.pipeline > 1:
            last = mesh.rank_of(self.d, mesh.pipeline - 1, 0)
            if self.is_reader:
                y = y.to(self.label_dtype).contiguous()
                comm.exchange({last: y}, {})
                self._input_bytes += y.numel() * y.element_size()
            elif comm.rank == last:
                y = torch.empty(self.batch, dtype=self.label_dtype, device=self.ctx.device)
                comm.exchange({}, {reader: y})
            return x, y
        if mesh.tensor > 1:
            peers = [r for r in mesh.tensor_ranks(self.d, 0) if r != reader]
            if self.is_reader:
                x, y = x.contiguous(), y.to(self.label_dtype).contiguous()
                comm.exchange({**{p: x for p in peers}}, {})
                comm.exchange({**{p: y for p in peers}}, {})
                self._input_bytes += len(peers) * (x.numel() * x.element_size()
                                                   + y.numel() * y.element_size())
            else:
                x = torch.empty(self.batch, self.ctx.in_features, device=self.ctx.device)
                y = torch.empty(self.batch, dtype=self.label_dtype, device=self.ctx.device)
                comm.exchange({}, {reader: x})
                comm.exchange({}, {reader: y})
        return x, y

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        x, y = self._inputs(x, y)
        meter = SavedTensorMeter(self.params) if self._measure and self.mesh.tensor == 1 \
            else contextlib.nullcontext()
        with meter:
            if self.pipe is not None:
                loss = self.pipe.step(x, y)
                loss = (loss * self.mesh.pipeline if loss is not None
                        else torch.zeros((), device=self.ctx.device))
            else:
                out = self.net(x)
                loss = self.loss(out, prepare_target(y, out, self.task))
                loss.backward()
        if self.data_comm is not None:
            self._average_gradients()
        t_opt = time.perf_counter()
        self.optimizer.step()
        self.scheduler.step()
        if self.pipe is not None:  # the bubble: this step's wall time against its compute
            now = time.perf_counter()
            self.pipe.busy_s += now - t_opt
            self.pipe.wall_s += now - t0
        if self._measure:
            self._memory = (state_bytes(self.params, self.optimizer),
                            meter.peak if isinstance(meter, SavedTensorMeter) else 0)
            self._measure = False
        self._steps = step + 1
        return loss.detach()

    @torch.no_grad()
    def _average_gradients(self) -> None:
        assert self.data_comm is not None
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))
                 for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.data_comm.all_reduce(flat, "avg")
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            if p.grad is not None:
                _local(p.grad).copy_(flat[offset:offset + n].view_as(g))
            offset += n

    # -- the whole model ---------------------------------------------------------------------

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on every rank (collective)."""
        if self.mesh.tensor > 1:
            return tp.full_state(self.net)
        if self.mesh.pipeline == 1:
            return {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        mine = ({k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
                if self.d == 0 else None)
        full: dict[str, torch.Tensor] = {}
        for part in self.ctx.comm.all_gather_object(mine):
            full.update(part or {})
        return full

    def _whole_model(self) -> nn.Module:
        if self._assembled_at != self._steps or self._assembled is None:
            state = self._full_state()
            if self._assembled is None:
                with torch.random.fork_rng(devices=[]):
                    self._assembled = build_model(
                        self.ctx.cfg.model.factory, self.ctx.in_features, self.ctx.num_outputs,
                        self.ctx.cfg.model.kwargs).to(self.ctx.device)
            self._assembled.load_state_dict(state)
            self._assembled_at = self._steps
        return self._assembled

    def eval_module(self) -> nn.Module:
        """The whole model, assembled from the stages or shards (collective)."""
        return self._whole_model()

    # -- checkpoint --------------------------------------------------------------------------

    def state(self) -> StrategyState:
        whole = self._whole_model().state_dict()
        if self.mesh.tensor > 1:
            part = tp.local_state(self.net, self.optimizer)
        else:
            part = {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}
        part.update(scheduler=self.scheduler.state_dict(), steps=self._steps,
                    coords=[self.d, self.s, self.t])
        shared = {"model": whole, "steps": self._steps, "mesh": self.mesh.describe()}
        return StrategyState(shared=shared, per_rank=part)

    def load_state(self, shared: dict[str, Any], per_rank: dict[str, Any] | None) -> None:
        if per_rank is None or shared.get("mesh") != self.mesh.describe():
            raise CheckpointError(
                f"the model_parallel checkpoint was written on mesh {shared.get('mesh')} and has "
                f"{'no' if per_rank is None else 'a'} part for rank {self.ctx.comm.rank}; this "
                f"job's mesh is {self.mesh.describe()} (data x pipeline x tensor). Resume with "
                "the checkpoint's strategy settings, or start a new run.")
        if list(per_rank["coords"]) != [self.d, self.s, self.t]:
            raise CheckpointError(f"rank {self.ctx.comm.rank}'s checkpoint part is for mesh "
                                  f"position {per_rank['coords']}, not {[self.d, self.s, self.t]}.")
        if self.mesh.tensor > 1:
            tp.load_local_state(self.net, self.optimizer, per_rank)
        else:
            self.net.load_state_dict(per_rank["model"])
            self.optimizer.load_state_dict(per_rank["optimizer"])
        self.scheduler.load_state_dict(per_rank["scheduler"])
        self._steps = int(per_rank["steps"])

    def rows_per_step(self, batch_size: int, world_size: int) -> int:
        """One batch per replica: the stages or shards of a replica share it."""
        return batch_size * self.mesh.data

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    # -- metrics -----------------------------------------------------------------------------

    def take_metrics(self, steps: int) -> dict[str, float]:
        """Idle share per stage and bytes per step (one all_gather_object; every rank calls it
        at each window)."""
        steps = max(1, steps)
        busy, wall, sent = self.pipe.take() if self.pipe is not None else (0.0, 0.0, 0)
        memory = self._memory or (0, 0)
        rows = self.ctx.comm.all_gather_object((self.s, busy, wall, sent, self._input_bytes,
                                                *memory))
        self._input_bytes, self._measure = 0, True
        out = {"comm/activation_bytes_per_step": sum(r[3] for r in rows) / steps,
               "comm/input_bytes_per_step": sum(r[4] for r in rows) / steps,
               "memory/state_bytes_max_rank": float(max(r[5] for r in rows)),
               "memory/saved_bytes_max_rank": float(max(r[6] for r in rows)),
               "memory/peak_bytes_max_rank": float(max(r[5] + r[6] for r in rows))}
        if self.mesh.pipeline > 1:
            idle = []
            for s in range(self.mesh.pipeline):
                mine = [1.0 - r[1] / r[2] for r in rows if r[0] == s and r[2] > 0]
                if mine:
                    out[f"pipeline/idle_share_stage{s}"] = sum(mine) / len(mine)
                    idle.append(out[f"pipeline/idle_share_stage{s}"])
            if idle:
                out["pipeline/idle_share"] = sum(idle) / len(idle)
            out["pipeline/ideal_bubble"] = ideal_bubble(self.mesh.pipeline, self.cfg.micro_batches,
                                                        self.cfg.virtual_stages)
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (shares its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t
