"""The parallel layout: which ranks hold which part of the model, checked before anything can hang.

    world = pp x dp                   dp: data-parallel degree (each dp rank sees other sequences)
    dp    = dp_replicate x dp_shard   FSDP2 shards dense parameters over dp_shard (ZeRO-3), and
                                      replicates them over dp_replicate (HSDP; all-reduce of grads)
    dp    = edp x ep                  routed experts are split over ep ranks (expert parallelism);
                                      each expert is replicated over edp ranks

Rank order is row-major over (pp, dp): rank = pp_index * dp + dp_index, and dp_index =
replicate_index * dp_shard + shard_index = edp_index * ep + ep_index, so one torchrun layout serves
FSDP, EP and pipelining on the same DeviceMesh family (torchtitan's `ParallelDims` makes the
same split; EP borrows ranks from data parallelism rather than adding a world dimension).

`--dp-shard`, `--ep` and `--pp` each default to 1; what is left of the world is replicated data
parallelism. Every mistake (a layout that does not divide the world, experts or batch that do not
split over it, a schedule that needs more stages than there are layers) is one `UserError` naming the
flag and the fix, raised on every rank before the first collective.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from ..common import UserError
from ..config import ModelConfig

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

PP_SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipev")
STAGES_PER_RANK = {"1f1b": 1, "interleaved": 2, "zbv": 2, "dualpipev": 2}
V_SHAPED = ("zbv", "dualpipev")        # rank r holds stages r and 2*pp-1-r: embedding and head on rank 0


@dataclass
class Layout:
    world: int = 1
    dp_shard: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0            # 0: as many as there are stages

    @property
    def dp(self) -> int:
        return self.world // self.pp

    @property
    def dp_replicate(self) -> int:
        return self.dp // self.dp_shard

    @property
    def edp(self) -> int:
        return self.dp // self.ep

    @property
    def n_stages(self) -> int:
        return self.pp * STAGES_PER_RANK[self.pp_schedule] if self.pp > 1 else 1

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.n_stages

    def describe(self) -> str:
        parts = [f"world {self.world}", f"dp {self.dp} (shard {self.dp_shard} x replicate {self.dp_replicate})"]
        if self.ep > 1:
            parts.append(f"ep {self.ep}")
        if self.pp > 1:
            parts.append(f"pp {self.pp} ({self.pp_schedule}, {self.n_stages} stages, {self.microbatches} "
                         f"micro-batches)")
        return ", ".join(parts)


def check_layout(lay: Layout, mcfg: ModelConfig, batch_size: int, mtp: bool) -> None:
    """Raise UserError for a layout that cannot run; called on every rank before any collective."""
    for name in ("dp_shard", "ep", "pp"):
        if getattr(lay, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(lay, name)})")
    if lay.pp_schedule not in PP_SCHEDULES:
        raise UserError(f"--pp-schedule {lay.pp_schedule!r}: choose one of {', '.join(PP_SCHEDULES)}")
    if lay.world % lay.pp:
        raise UserError(f"--pp {lay.pp} does not divide the world size {lay.world}: launch a multiple of "
                        f"{lay.pp} processes (torchrun --nproc_per_node) or change --pp")
    if lay.dp % lay.dp_shard:
        raise UserError(f"--dp-shard {lay.dp_shard} does not divide the data-parallel size {lay.dp} "
                        f"(= world {lay.world} / pp {lay.pp}): use a divisor of {lay.dp}")
    if lay.dp % lay.ep:
        raise UserError(f"--ep {lay.ep} does not divide the data-parallel size {lay.dp} "
                        f"(= world {lay.world} / pp {lay.pp}): use a divisor of {lay.dp}")
    if lay.ep > 1:
        if not mcfg.n_routed_experts:
            raise UserError(f"--ep {lay.ep}: the model has no routed experts; drop --ep")
        if mcfg.n_routed_experts % lay.ep:
            raise UserError(f"--ep {lay.ep} does not divide n_routed_experts={mcfg.n_routed_experts}: "
                            f"use a divisor of {mcfg.n_routed_experts}")
    if batch_size % lay.dp:
        raise UserError(f"--batch-size {batch_size} does not split over {lay.dp} data-parallel ranks: use a "
                        f"multiple of {lay.dp}")
    if lay.pp > 1 and lay.dp_shard > 1:
        raise UserError(f"--dp-shard {lay.dp_shard} with --pp {lay.pp} is not supported (FSDP inside pipeline "
                        "stages is not wired): drop --dp-shard (the ranks beyond pp then replicate the stages) "
                        "or drop --pp")
    if lay.pp > 1:
        L = mcfg.num_hidden_layers
        if L % lay.n_stages:
            raise UserError(f"--pp {lay.pp} with --pp-schedule {lay.pp_schedule} makes {lay.n_stages} stages, "
                            f"which do not divide num_hidden_layers={L}: choose --pp so that "
                            f"{STAGES_PER_RANK[lay.pp_schedule]} x pp divides {L}")
        local = batch_size // lay.dp
        if local % lay.microbatches:
            raise UserError(f"--pp-microbatches {lay.microbatches}: the per-rank batch {local} (--batch-size "
                            f"{batch_size} / dp {lay.dp}) must be a multiple of it")
        rounds = max(1, lay.microbatches // lay.pp)
        if lay.pp_schedule == "interleaved" and lay.microbatches % rounds:
            raise UserError(f"--pp-microbatches {lay.microbatches}: interleaved 1F1B runs them in rounds of pp "
                            f"({lay.pp}); use a multiple of {lay.pp} (or fewer than {2 * lay.pp})")
        if lay.microbatches < lay.n_stages:
            raise UserError(f"--pp-microbatches {lay.microbatches} < {lay.n_stages} stages: the schedule needs "
                            f"at least one micro-batch per stage")
        if mtp and lay.pp_schedule not in V_SHAPED:
            raise UserError(f"--pp-schedule {lay.pp_schedule} puts the embedding and the output head on "
                            f"different ranks, but MTP needs both (V3 keeps them on one rank): use "
                            f"--pp-schedule dualpipev or zbv, or --mtp-lambda 0")
        if mcfg.tie_word_embeddings:
            raise UserError("--pp with tie_word_embeddings: the embedding and the head would live in "
                            "different stages; untie them or drop --pp")
    if mcfg.tie_word_embeddings and lay.dp > 1:
        raise UserError("data parallelism (FSDP2) with tie_word_embeddings is not supported: the head and the "
                        "embedding would be sharded as two parameters; untie them or run one data-parallel rank")


@dataclass
class Dist:
    """This process's place in the layout, and the process groups it talks over."""
    layout: Layout
    rank: int
    device: torch.device
    mesh: "DeviceMesh | None" = None       # (pp, dp_replicate, dp_shard)
    emesh: "DeviceMesh | None" = None      # (pp, edp, ep)
    groups: dict = field(default_factory=dict)

    @property
    def pp_rank(self) -> int:
        return self.rank // self.layout.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.layout.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.layout.ep

    def group(self, name: str):
        """The "dp", "ep", "edp", "pp" or "world" process group (None when that dimension is 1)."""
        return self.groups.get(name)


def launched_with_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def layout_from_env(verb: str, dp_shard: int = 1, ep: int = 1, pp: int = 1, pp_schedule: str = "1f1b",
                    pp_microbatches: int = 0) -> Layout | None:
    """The layout of a run launched by torchrun (even with every degree 1), else None; parallel flags
    without torchrun are a UserError that gives the launch command."""
    if not launched_with_torchrun():
        if dp_shard > 1 or ep > 1 or pp > 1:
            raise UserError(f"--dp-shard/--ep/--pp need one process per rank: launch with "
                            f"`torchrun --nproc_per_node {math.lcm(dp_shard, ep) * pp} -m nanoseek {verb} ...`")
        return None
    return Layout(world=int(os.environ["WORLD_SIZE"]), dp_shard=dp_shard, ep=ep, pp=pp,
                  pp_schedule=pp_schedule, pp_microbatches=pp_microbatches)


def init(lay: Layout, device: torch.device) -> Dist:
    """Join the process group (gloo on CPU, nccl on CUDA) and build the meshes of `lay`."""
    from torch.distributed.device_mesh import init_device_mesh

    rank = int(os.environ.get("RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # on GPUs, NCCL for CUDA tensors and gloo beside it for the few CPU-side collectives (objects, metrics)
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        # a collective one rank never joins fails after this long instead of hanging (tests set it short)
        timeout = float(os.environ.get("NANOSEEK_DIST_TIMEOUT_S", 600))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    d = Dist(lay, rank, device)
    kind = device.type
    d.mesh = init_device_mesh(kind, (lay.pp, lay.dp_replicate, lay.dp_shard),
                              mesh_dim_names=("pp", "dp_replicate", "dp_shard"))
    d.emesh = init_device_mesh(kind, (lay.pp, lay.edp, lay.ep), mesh_dim_names=("pp", "edp", "ep"))
    dp_mesh = init_device_mesh(kind, (lay.pp, lay.dp), mesh_dim_names=("pp", "dp"))
    d.groups = {"world": dist.group.WORLD,
                "dp": dp_mesh.get_group("dp") if lay.dp > 1 else None,
                "pp": dp_mesh.get_group("pp") if lay.pp > 1 else None,
                "ep": d.emesh.get_group("ep") if lay.ep > 1 else None,
                "edp": d.emesh.get_group("edp") if lay.edp > 1 else None}
    return d


def shutdown() -> None:
    """Leave the process group once every rank is done (a process exiting with it still up can abort
    in gloo's threads)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum over `group` in place (no-op for a size-1 dimension, whose group is None)."""
    if group is not None:
        dist.all_reduce(t, group=group)
    return t
