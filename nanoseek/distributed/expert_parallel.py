"""Expert parallelism: the routed experts of every MoE layer split over the EP ranks, tokens moved to
their experts and back with two uneven all-to-alls (V3 sec. 3.2.2, DeepEP's dispatch/combine).

Shape legend: T local tokens, K experts per token, E routed experts, El = E / ep local experts, N rows
received by this rank, D hidden.

    route (replicated gate, local tokens)  ->  (T, K) expert ids and weights
    dispatch: sort the T*K (token, expert) pairs by the expert's physical slot (rank-major), exchange
              per-expert counts (one small all_to_all), then all_to_all the token rows with uneven
              splits: rank r receives every pair routed to one of its El experts, grouped by source
              rank and, within one, by local expert
    experts:  the received rows through this rank's El experts in the per-expert contiguous layout
              (`sorted_experts`, the same padded GEMMs as one process; an FP8 GEMM plugs in as there)
    combine:  the reverse all_to_all, then each row times its routing weight, summed into its token

Both all-to-alls carry autograd (their backward is the opposite exchange), so the gradients of the
local expert weights are those of the tokens of every rank in the EP group. What keeps EP training
equal to one process: the router, the shared expert and everything dense are replicated, the
auxiliary-loss-free bias update sees the load all-reduced over the data-parallel group (the
trainer does that), and each expert's gradient is summed over the ranks that replicate it (`edp`).

Placement: by default expert e lives on rank e // El. `placements` (per MoE layer, a permutation of the E experts,
e.g. from EPLB without redundant replicas, `nanoseek eplb`) puts logical expert phy2log[s] in
physical slot s instead; checkpoints keep logical order, so a new placement can be applied at any
checkpoint boundary. Redundant replicas (two slots holding one expert) are not supported in training:
their weights would have to stay identical, which needs a gradient all-reduce between the replicas.

Left out: overlapping the all-to-alls with compute (DualPipe's F&B pairing), FP8 dispatch payloads,
DeepEP's NVLink/RDMA kernels; on gloo the exchange is synchronous.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
from torch import nn

from ..common import UserError
from ..model.moe import Experts, MoE, sorted_experts
from ..model.transformer import moe_layer_id
from ..quant.fp8 import fp8_matmul


class ExpertParallelExperts(nn.Module):
    """This rank's El experts (w13 (El, 2F, D), w2 (El, D, F), same names as `Experts`) plus the
    dispatch/combine around them. `slot_of` (E,) maps a logical expert to its physical slot."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, phy2log: torch.Tensor, group, ep: int, mm=None):
        super().__init__()
        self.w13, self.w2 = nn.Parameter(w13), nn.Parameter(w2)
        slot_of = torch.empty_like(phy2log)
        slot_of[phy2log] = torch.arange(phy2log.numel())
        self.register_buffer("phy2log", phy2log.clone(), persistent=False)    # logical expert in each slot
        self.register_buffer("slot_of", slot_of, persistent=False)            # slot of each logical expert
        self.group, self.ep, self.mm = group, ep, mm

    def forward(self, x_TD, weights_TK, idx_TK, impl: str):
        T, K = idx_TK.shape
        E, El = self.slot_of.numel(), self.w13.shape[0]
        slot = self.slot_of[idx_TK.flatten()]                                  # (T*K,)
        order = slot.argsort(stable=True)
        token = order // K
        xs = x_TD.index_select(0, token)
        counts = torch.bincount(slot, minlength=E)                            # pairs per physical slot
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)         # (ep, El): for my experts
        send = counts.view(self.ep, El).sum(1).tolist()
        recv_counts = recv_counts.view(self.ep, El)
        recv = recv_counts.sum(1).tolist()
        xr = wait_tensor(all_to_all_single_autograd(xs, recv, send, self.group))
        local = torch.arange(El, device=x_TD.device).repeat(self.ep).repeat_interleave(recv_counts.flatten())
        ones = torch.ones(local.numel(), 1, dtype=weights_TK.dtype, device=x_TD.device)
        # "dense"/"gather" (every expert on every token / per-token weight gathers) are one-process shortcuts
        # for few tokens; here the rows arrive grouped by expert, so the sorted layout is always right
        impl = "grouped" if impl == "grouped" else "loop" if impl == "loop" else "padded"
        if xr.shape[0] == 0:
            # none of this rank's experts was chosen. The output must still depend on xr (so that backward
            # runs the reverse all-to-all every other rank waits for) and on the weights (zero gradients,
            # not missing ones, for the gradient all-reduce)
            yr = xr * 0 + 0 * (self.w13.sum() + self.w2.sum()).to(xr.dtype)
        else:
            yr = sorted_experts(xr, ones, local.unsqueeze(1), self.w13, self.w2, impl, mm=self.mm)
        ys = wait_tensor(all_to_all_single_autograd(yr.contiguous(), send, recv, self.group))
        ys = ys * weights_TK.flatten()[order].unsqueeze(1).to(ys.dtype)
        return torch.zeros_like(x_TD, dtype=ys.dtype).index_add_(0, token, ys)


def identity_placement(n_experts: int) -> torch.Tensor:
    return torch.arange(n_experts)


def check_placement(phy2log: torch.Tensor, n_experts: int) -> torch.Tensor:
    p = torch.as_tensor(phy2log, dtype=torch.long)
    if p.dim() != 1 or p.numel() != n_experts or not torch.equal(p.sort().values, torch.arange(n_experts)):
        raise UserError(f"expert placement: expected a permutation of the {n_experts} experts (EPLB with "
                        "--redundant 0); redundant replicas are not supported in training")
    return p


def apply_expert_parallel(model: nn.Module, group, ep: int, ep_rank: int,
                          placements: dict[int, torch.Tensor] | None = None) -> list[str]:
    """Replace every MoE's experts (main and MTP blocks) with this rank's slice and the all-to-all
    around it, in place; returns the parameter names now holding slices. `placements` maps a MoE's
    layer id (`moe_layer_id`) to its phy2log permutation (default: expert e on rank e // El)."""
    names = []
    for name, moe in list(model.named_modules()):
        if not isinstance(moe, MoE):
            continue
        experts = moe.experts
        if not isinstance(experts, Experts):
            raise UserError(f"expert parallelism: {name}.experts is a {type(experts).__name__}; apply EP once, "
                            "after FP8 conversion")
        E = experts.w13.shape[0]
        El = E // ep
        placed = placements.get(moe_layer_id(name, model.cfg.num_hidden_layers)) if placements else None
        phy2log = check_placement(placed if placed is not None else identity_placement(E), E)
        mine = phy2log[ep_rank * El:(ep_rank + 1) * El]
        recipe = getattr(experts, "recipe", None)
        mm = functools.partial(fp8_matmul, recipe=recipe) if recipe is not None else None  # FP8Experts: keep FP8
        with torch.no_grad():
            w13 = experts.w13.detach()[mine].clone()
            w2 = experts.w2.detach()[mine].clone()
        moe.experts = ExpertParallelExperts(w13, w2, phy2log.to(w13.device), group, ep, mm)
        names += [f"{name}.experts.w13", f"{name}.experts.w2"]
    return names


def expert_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ExpertParallelExperts)}


def load_placement(path: str | Path, ep: int, mcfg) -> dict[int, torch.Tensor]:
    """{MoE layer id: phy2log} from `nanoseek eplb --redundant 0 --ranks EP`'s JSON, checked against
    this run (EP degree, expert count, one permutation per layer)."""
    path = Path(path)
    try:
        rec = json.loads(path.read_text())
        layers, phy2log = [int(i) for i in rec["layers"]], rec["phy2log"]
        ranks, redundant = int(rec["ranks"]), int(rec.get("redundant", 0))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(f"--ep-placement {path}: not a placement written by `nanoseek eplb` "
                        f"({type(e).__name__}: {e})") from None
    if redundant:
        raise UserError(f"--ep-placement {path}: it places {redundant} redundant replicas, which training does "
                        f"not support; write one with `nanoseek eplb --redundant 0 --ranks {ep}`")
    if ranks != ep:
        raise UserError(f"--ep-placement {path}: made for {ranks} ranks, this run has --ep {ep}; write one with "
                        f"`nanoseek eplb --redundant 0 --ranks {ep}`")
    if len(phy2log) != len(layers):
        raise UserError(f"--ep-placement {path}: {len(layers)} layer ids but {len(phy2log)} placements")
    moe_ids = [i for i in range(mcfg.num_hidden_layers + mcfg.num_nextn_predict_layers) if mcfg.is_moe_layer(i)]
    out = {}
    for layer, p in zip(layers, phy2log):
        if layer not in moe_ids:
            raise UserError(f"--ep-placement {path}: layer {layer} is not a MoE layer of this model "
                            f"(MoE layers: {moe_ids}); was it written for another run?")
        out[layer] = check_placement(p, mcfg.n_routed_experts)
    return out
