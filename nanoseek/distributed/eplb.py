"""`nanoseek eplb`: expert-parallel load balancing - which rank holds which experts, and how many copies.

The problem. Under expert parallelism (EP) each of G ranks holds R/G "physical" expert slots and runs
every token routed to them; a step waits for the busiest rank, so the cost is max rank load, and
max/mean is the slowdown against perfect balance. Routed loads stay skewed even with V3's bias
balancing (per batch, per domain), and the contiguous placement (experts 0..E/G-1 on rank 0, ...)
sits at max/mean ~2.4 on V3-like log-normal loads. DeepSeek's answer (V3 report sec. 3.4, released
as deepseek-ai/EPLB): give R - E slots to copies of the heaviest experts (V3 prefill: 256 + 32 = 288
slots on 32 GPUs, 9 per GPU), split a copied expert's tokens over its copies, and pack the copies so
every rank gets about the same load. This module is our own implementation of that description.

Input: `load_LE`, tokens routed to each logical expert per MoE layer (a run's `expert_load.json`).
Output, a `Placement`:
    phy2log (L, R)          logical expert in each physical slot; slots rank-major: rank g owns slots
                            g*R/G .. (g+1)*R/G-1
    log2phy (L, E, maxrep)  the slots of each logical expert, ascending, padded with -1
    logcnt  (L, E)          replicas per logical expert (>= 1, sums to R)

Hierarchical policy (num_groups % num_nodes == 0, e.g. prefill). V3 routes each token to experts of at
most 4 of its 8 groups, so keeping a group's experts - copies included - on one node bounds a token's
cross-node (InfiniBand) traffic at 4 nodes. Three steps, each greedy:
  1. groups -> nodes: balanced packing of the group loads, K/N groups per node.
  2. inside a node: its E/N experts get R/N slots; each extra slot goes, one at a time, to the expert
     whose load per replica (load / count) is largest right now.
  3. replicas -> ranks: balanced packing of the node's R/N replicas (each weighing load / count of its
     expert) onto the node's G/N ranks, R/G per rank.
Global policy otherwise (e.g. decode with EP over 144 GPUs): the same with one group and one node, so
replicas go anywhere.

Balanced packing: sort the items heaviest first, give each to the currently lightest pack that still
has room (every pack takes exactly n/packs items). It is the LPT heuristic with a count limit: fast and
close in practice, not optimal in general (the exact problem is NP-hard).

Simplified or left out: the loads are given (no load predictor or moving average: the run writes
cumulative counts); a new placement ignores the previous one (no attempt to minimise expert weights
moved); a copied expert's tokens are assumed split evenly (the dispatcher decides in practice); the
shared expert is on every rank and not counted; nothing here moves weights or routes tokens - this is
the plan an EP runtime would apply. Ties are broken by lowest index, which reproduces the README
example of deepseek-ai/EPLB slot for slot (tests/test_eplb.py).

Figures, mean over layers of max/mean rank load, V3 prefill shape (`nanoseek eplb --synthetic --layers 58
--experts 256 --ranks 32 --nodes 4 --groups 8 --redundant 32`, 0.15 s on 2 CPU cores):
    placement                     seed 0   seeds 1-3           deepseek-ai/EPLB, its own draw
    contiguous (8 per rank)        2.28    2.40 2.31 2.25      2.41
    EPLB, no redundancy            1.44    1.53 1.46 1.43      1.52
    EPLB + 32 redundant (9/rank)   1.07    1.07 1.06 1.07      1.08

Shape legend: L MoE layers, E logical experts, R physical slots, G ranks.
"""
from __future__ import annotations

import heapq
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import args as argparse_dc
from ..common import UserError


@dataclass
class Placement:
    phy2log: torch.Tensor   # (L, R) long
    log2phy: torch.Tensor   # (L, E, max replicas) long, -1 padded
    logcnt: torch.Tensor    # (L, E) long


def balanced_packing(weights: list[float], num_packs: int) -> list[list[int]]:
    """Item indices per pack: heaviest first, each to the lightest pack with room (ties: lowest index);
    every pack gets len(weights) // num_packs items, listed in the order they were packed."""
    per_pack = len(weights) // num_packs
    assert per_pack * num_packs == len(weights)
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    heap = [(0.0, p) for p in range(num_packs)]          # (load, pack) of the packs that have room
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):   # stable: equal loads by index
        load, p = heapq.heappop(heap)
        packs[p].append(i)
        if len(packs[p]) < per_pack:
            heapq.heappush(heap, (load + weights[i], p))
    return packs


def replicate(weights: list[float], num_slots: int) -> list[int]:
    """Replica count per expert: one each, then every extra slot to the largest load per replica."""
    counts = [1] * len(weights)
    for _ in range(num_slots - len(weights)):
        e = max(range(len(weights)), key=lambda e: weights[e] / counts[e])   # first of equals
        counts[e] += 1
    return counts


def _place_layer(load: list[float], R: int, K: int, N: int, G: int) -> list[int]:
    """phy2log of one layer: steps 1-3 of the docstring (global policy = K = N = 1)."""
    group_size = len(load) // K
    group_load = [sum(load[k * group_size:(k + 1) * group_size]) for k in range(K)]
    phy2log = []
    for groups in balanced_packing(group_load, N):                                   # step 1
        experts = [k * group_size + j for k in groups for j in range(group_size)]
        counts = replicate([load[e] for e in experts], R // N)                       # step 2
        replicas = experts + [e for e, c in zip(experts, counts) for _ in range(c - 1)]
        per_replica = {e: load[e] / c for e, c in zip(experts, counts)}
        for rank in balanced_packing([per_replica[e] for e in replicas], G // N):    # step 3
            phy2log += [replicas[i] for i in rank]
    return phy2log


def _placement(phy2log_LR: torch.Tensor, E: int) -> Placement:
    L = phy2log_LR.shape[0]
    logcnt = torch.zeros(L, E, dtype=torch.long).scatter_add_(1, phy2log_LR, torch.ones_like(phy2log_LR))
    slots = [[[] for _ in range(E)] for _ in range(L)]
    for l, row in enumerate(phy2log_LR.tolist()):
        for slot, e in enumerate(row):
            slots[l][e].append(slot)
    M = int(logcnt.max())
    log2phy = torch.tensor([[s + [-1] * (M - len(s)) for s in layer] for layer in slots], dtype=torch.long)
    return Placement(phy2log_LR, log2phy, logcnt)


def _check(load_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_ranks: int) -> None:
    if load_LE.dim() != 2 or load_LE.numel() == 0:
        raise UserError(f"load_LE: expected a (layers, experts) tensor, got shape {tuple(load_LE.shape)}")
    if not torch.isfinite(load_LE).all() or (load_LE < 0).any():
        raise UserError("load_LE: loads must be finite and >= 0 (routed-token counts)")
    E = load_LE.shape[1]
    if num_nodes < 1 or num_ranks < 1 or num_groups < 1:
        raise UserError(f"num_nodes={num_nodes}, num_ranks={num_ranks}, num_groups={num_groups}: each must be >= 1")
    if num_ranks % num_nodes:
        raise UserError(f"num_ranks (--ranks) = {num_ranks} must be a multiple of num_nodes (--nodes) = {num_nodes}, "
                        "every node having the same number of ranks")
    if num_replicas < E:
        raise UserError(f"num_replicas = {num_replicas} is below the {E} logical experts: every expert needs a slot "
                        "(num_replicas = experts + redundant)")
    if num_replicas % num_ranks:
        valid = [r for r in (num_replicas // num_ranks * num_ranks, (num_replicas // num_ranks + 1) * num_ranks)
                 if r >= E]
        raise UserError(f"num_replicas = {num_replicas} ({E} experts + {num_replicas - E} redundant) must be a "
                        f"multiple of num_ranks (--ranks) = {num_ranks} so every rank holds as many slots; nearest: "
                        + " or ".join(f"{r} (--redundant {r - E})" for r in valid))
    if E % num_groups:
        raise UserError(f"num_groups (--groups) = {num_groups} must divide the {E} experts (the model's n_group)")


def rebalance(load_LE: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int,
              num_ranks: int) -> Placement:
    """EPLB placement of num_replicas slots per layer; hierarchical when num_groups % num_nodes == 0."""
    _check(load_LE, num_replicas, num_groups, num_nodes, num_ranks)
    K, N = (num_groups, num_nodes) if num_groups % num_nodes == 0 else (1, 1)
    rows = [_place_layer(l, num_replicas, K, N, num_ranks) for l in load_LE.double().tolist()]
    return _placement(torch.tensor(rows, dtype=torch.long), load_LE.shape[1])


def contiguous(E: int, num_ranks: int, num_layers: int = 1) -> Placement:
    """The default EP placement: rank g holds experts g*E/G .. (g+1)*E/G-1, one copy each."""
    if E % num_ranks:
        raise UserError(f"num_ranks (--ranks) = {num_ranks} must divide the {E} experts for a placement without "
                        "redundant experts")
    return _placement(torch.arange(E).repeat(num_layers, 1), E)


def rank_loads(load_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_ranks: int) -> torch.Tensor:
    """(L, G) expected load per rank, each logical expert's load split evenly over its replicas."""
    load_LE = load_LE.double()
    logcnt = torch.zeros_like(load_LE).scatter_add_(1, phy2log_LR, torch.ones_like(phy2log_LR, dtype=torch.double))
    per_slot_LR = (load_LE / logcnt.clamp(min=1)).gather(1, phy2log_LR)
    return per_slot_LR.view(load_LE.shape[0], num_ranks, -1).sum(-1)


def imbalance(load_LE: torch.Tensor, phy2log_LR: torch.Tensor, num_ranks: int) -> tuple[torch.Tensor, float]:
    """Max/mean rank load per layer (1.0 is perfect; a layer with no load counts as 1.0) and its mean."""
    ranks_LG = rank_loads(load_LE, phy2log_LR, num_ranks)
    mean_L = ranks_LG.mean(-1)
    ratio_L = torch.where(mean_L > 0, ranks_LG.max(-1).values / mean_L.clamp(min=1e-300), torch.ones_like(mean_L))
    return ratio_L, float(ratio_L.mean())


def load_records(path: str | Path) -> tuple[torch.Tensor, list[int], int]:
    """(load_LE, MoE layer ids, steps) from a run's expert_load.json (or the run directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "expert_load.json"
    if not path.exists():
        raise UserError(f"{path}: no such file; a pretraining run writes OUT/expert_load.json "
                        "(or use --synthetic)")
    try:
        rec = json.loads(path.read_text())
        load = torch.tensor(rec["load"], dtype=torch.double)
        layers = [int(i) for i in rec["layers"]]
        steps = int(rec.get("steps", 0))
    except (ValueError, TypeError, KeyError) as e:      # bad JSON, ragged rows, missing key
        raise UserError(f"{path}: expected {{\"layers\": [ids], \"load\": [[E floats] per layer], \"steps\": n}} "
                        f"({type(e).__name__}: {e})") from None
    if load.dim() != 2 or load.numel() == 0 or len(layers) != load.shape[0]:
        raise UserError(f"{path}: \"load\" must be one non-empty row of expert loads per id in \"layers\" "
                        f"({len(layers)} ids, load shape {tuple(load.shape)})")
    if not torch.isfinite(load).all() or (load < 0).any():
        raise UserError(f"{path}: loads must be finite and >= 0")
    return load, layers, steps


@dataclass
class EplbConfig:
    run: str | None = field(default=None, metadata={"help": "run directory holding expert_load.json"})
    synthetic: bool = field(default=False, metadata={"help": "log-normal loads instead of --run (V3-like skew)"})
    ranks: int = field(default=0, metadata={"help": "expert-parallel ranks (GPUs); required"})
    nodes: int = field(default=1, metadata={"help": "nodes the ranks are spread over"})
    groups: int = field(default=1, metadata={"help": "expert groups (the model's n_group; V3: 8); the hierarchical "
                                                     "policy keeps groups on nodes when --nodes divides it"})
    redundant: int | None = field(default=None, metadata={"help": "extra physical experts (default: one per rank)"})
    out: str | None = field(default=None, metadata={"help": "placement JSON (default: RUN/eplb.json or eplb.json)"})
    layers: int = field(default=58, metadata={"help": "--synthetic: MoE layers"})
    experts: int = field(default=256, metadata={"help": "--synthetic: routed experts per layer"})
    seed: int = field(default=0, metadata={"help": "--synthetic: seed"})
    sigma: float = field(default=1.0, metadata={"help": "--synthetic: log-normal sigma of the loads"})


def main(argv=None) -> dict:
    cfg = argparse_dc.parse(EplbConfig, argv, prog="nanoseek eplb", description=__doc__.splitlines()[0])
    if (cfg.run is None) == (not cfg.synthetic):
        raise UserError("give exactly one of --run RUN_DIR and --synthetic")
    if cfg.ranks < 1:
        raise UserError("--ranks: give the number of expert-parallel ranks, e.g. --ranks 32")
    if cfg.synthetic:
        g = torch.Generator().manual_seed(cfg.seed)
        load = (torch.randn(cfg.layers, cfg.experts, generator=g, dtype=torch.double) * cfg.sigma).exp()
        layers, source = list(range(cfg.layers)), f"synthetic log-normal (sigma {cfg.sigma})"
    else:
        load, layers, steps = load_records(cfg.run)
        source = f"{cfg.run} ({steps} steps)"
    L, E = load.shape
    redundant = cfg.ranks if cfg.redundant is None else cfg.redundant
    if redundant < 0:
        raise UserError(f"--redundant {redundant}: must be >= 0")
    t0 = time.perf_counter()
    plans = {}
    if E % cfg.ranks == 0:      # one copy per expert needs E/G slots per rank (not so for EP144 decode)
        plans = {"contiguous": contiguous(E, cfg.ranks, L),
                 "eplb": rebalance(load, E, cfg.groups, cfg.nodes, cfg.ranks)}
    plans[f"eplb+{redundant}"] = rebalance(load, E + redundant, cfg.groups, cfg.nodes, cfg.ranks)
    seconds = time.perf_counter() - t0
    figures = {name: imbalance(load, p.phy2log, cfg.ranks) for name, p in plans.items()}
    policy = "hierarchical" if cfg.groups % cfg.nodes == 0 and cfg.nodes > 1 else "global"   # 1 node: the same
    print(f"{source}: {L} MoE layers x {E} experts on {cfg.ranks} ranks / {cfg.nodes} nodes, {cfg.groups} groups, "
          f"{policy} policy ({seconds:.2f} s)")
    if len(plans) == 1:
        print(f"(no contiguous or no-redundancy figures: {cfg.ranks} ranks do not divide {E} experts)")
    print("max/mean rank load per layer:")
    print(f"  {'layer':>5}" + "".join(f"{name:>13}" for name in plans))
    for i, layer in enumerate(layers):
        print(f"  {layer:>5}" + "".join(f"{float(per[i]):>13.3f}" for per, _ in figures.values()))
    print(f"  {'mean':>5}" + "".join(f"{mean:>13.3f}" for _, mean in figures.values()))
    best = plans[f"eplb+{redundant}"]
    out = Path(cfg.out) if cfg.out else (Path(cfg.run) if cfg.run else Path(".")) / "eplb.json"
    result = {"policy": policy, "ranks": cfg.ranks, "nodes": cfg.nodes, "groups": cfg.groups, "experts": E,
              "redundant": redundant, "slots_per_rank": (E + redundant) // cfg.ranks, "layers": layers,
              "phy2log": best.phy2log.tolist(), "logcnt": best.logcnt.tolist(),
              "max_over_mean": {name: {"per_layer": [round(float(x), 4) for x in per], "mean": round(mean, 4)}
                                for name, (per, mean) in figures.items()}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    print(f"placement -> {out}")
    return result
