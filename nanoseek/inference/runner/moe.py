"""DeepSeekMoE for the decode step: few rows, so the paths differ from training's sorted loop.

By rows T (E routed experts, K per token), the first three by rule:
  gather    2 T K <= E: gather just the chosen experts' weights (reads K experts per token, not E).
  dense     T <= DENSE_MAX_TOKENS and the fused weights exist: every routed expert's [gate; up] and the
            shared expert's as one GEMM, the routing weights folded into the activations (zero off
            the route), every down projection as a second GEMM. E/K x the routed FLOPs, in two
            well-shaped GEMMs: it wins while the step is bound by reading weights. Top-k is done by
            rank counting (`top_mask`), which fuses into one kernel under torch.compile.
  capacity  otherwise: each expert gets C rows, the pairs are scattered into an (E, C, D) buffer and
            the experts run as two batched matmuls over the stacked weights. An eager step sizes C to
            its busiest expert (read on the host, rounded up to 8 rows) and drops nothing. A compiled
            step's C is fixed: `capacity(T)` (2x the mean load; 4x on CUDA) until the runner has seen
            this router's loads (runner/__init__.py, `fit_capacity`); if an expert gets more pairs,
            the runner sees its load in `flags` and reruns the step eagerly. (A torch.cond
            inside the graph did the same, but a graph holding one cannot be cached on disk: every
            process recompiled its batch-64 bucket for ~19 s instead of loading it in ~5.)
  grouped   where the panel kernel is built (x86-64 with AVX2), and measured faster than the path the
            rules above give for this layer's shapes and T (`grouped_pays`, cached per host): the pairs
            laid out by expert, each expert's rows times its weight in one C++ call per projection
            (`gemm.grouped_linear`). Routed FLOPs only, each expert's weight read once, and every shape
            fixed by T, so a compiled step needs no capacity and never reruns. AVX2 EPYC, bench_grpo's
            model (hidden 256, 16 experts top-4), eager decode steps against the rules' path
            (`benchmarks/bench_grouped_moe.py`): 6.4 / 7.6 / 21.7 vs 6.9 / 9.9 / 25.6 ms at 1 / 8 / 64 rows
            (gather, dense, dense); `bench_grpo.py --steps 12` 2.14x TRL against 1.82x without it, the
            same hour.
            Compiled, where the rest of the step is cheaper, it won by 6-7% at batch 64 and lost 12% when
            forced at 8 (dense, which reads the same weight bytes, stays there): hence measured per shape.
Thresholds measured on the decode benchmark's model (hidden 256, 16 experts top-4, 2 cores): per
compiled MoE layer dense 701 vs capacity 933 us at 16 rows, even at 32, 1364 vs 1157 at 64; gather
+15% tokens/s over dense at batch 1.

The router stays fp32 (a bf16 router changes which experts are chosen). Every path is tested
against `nanoseek.model.moe.moe_reference`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...calibrate import best_time, remember
from ...model.moe import MoE, gate_choice, gather_experts, route, scale_weights
from ...quant.fp8 import WEIGHT, QTensor, dequantize
from . import gemm

DENSE_MAX_TOKENS = 16


def top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last dim (ties: lower index first), by counting
    for each entry how many others beat it: (..., n, n) comparisons, one fused kernel under
    torch.compile where topk would be a library call. For small n only."""
    n = x.shape[-1]
    a, b = x.unsqueeze(-1), x.unsqueeze(-2)                    # a: entry i, b: entry j
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)       # j < i
    beats = (b > a) | ((b == a) & lower)
    return beats.sum(dim=-1) < k


def route_dense(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg) -> torch.Tensor:
    """`route` without topk -> routing weights (T,E) fp32, zero off the route. Same selection and
    weights as `route` (up to float ties)."""
    scores, choice = gate_choice(logits_TE, bias_E, cfg, top_mask=top_mask)
    return scale_weights(scores * top_mask(choice, cfg.num_experts_per_tok), cfg)


def capacity(moe: MoE, T: int, device_type: str = "cpu") -> int:
    """Rows per expert on the capacity path: a multiple of the mean load, rounded up to a multiple of 8.
    Twice the mean on CPU, where the padded rows cost arithmetic. Four times on CUDA, where a step is
    bound by reading weights and the padded rows are nearly free, but an overflow reruns the step
    eagerly: on an H200 the 1.71B model (32 experts top-4) at batch 64 overflowed 2x in 152 of 381
    steps (bench_gpu.py). The same shapes decoded on CPU (benchmarks/moe_overflow.py): 6.7% of
    layer-steps overflow at 2x, none at 3x or 4x (the busiest expert got at most 21 pairs against a
    mean of 8)."""
    mean = T * moe.cfg.num_experts_per_tok / moe.cfg.n_routed_experts
    factor = 4 if device_type == "cuda" else 2
    return max(8, round8(factor * mean))


def round8(n: float) -> int:
    """Rows rounded up to a multiple of 8 (so that bf16 GEMM shapes recur)."""
    return math.ceil(n / 8) * 8


def layers_on(plan: dict, path: str) -> list[int]:
    """The MoE layers a decode plan runs on `path`, in the order a step runs them."""
    return sorted(int(k[3:-len(".path")]) for k, v in plan.items() if k.endswith(".path") and v == path)


# the share of a compiled bucket's steps a layer may overflow its capacity (each overflow reruns the whole
# step eagerly). Break-even, measured on bench_grpo's model at batch 64 (AVX2 EPYC): an eager rerun costs
# ~27 ms, while 8 more rows per expert cost one layer ~0.2 ms, so ~1-2% of steps
OVERFLOW_SHARE = 0.02


def fit_capacity(loads: list[int], C: int, ceiling: int, share: float = OVERFLOW_SHARE) -> int:
    """The smallest multiple of 8 rows, at least C, that more than `share` of the observed `loads`
    (the busiest expert's pairs per step) would not exceed; at most `ceiling` (the step's token count
    rounded up to 8, which no load can exceed: an expert takes a token at most once)."""
    allowed = int(share * len(loads))
    ranked = sorted(loads, reverse=True)
    need = ranked[allowed] if allowed < len(ranked) else 0        # the largest load that must fit
    return min(ceiling, max(C, round8(need)))


def choose_path(moe: MoE, T: int, has_dense: bool, grouped: bool = False) -> str:
    """The path for T rows by the rules above; `grouped`: the grouped kernel was measured faster than
    that path for this layer's shapes and T (`grouped_pays`)."""
    cfg = moe.cfg
    if grouped:
        return "grouped"
    if 2 * T * cfg.num_experts_per_tok <= cfg.n_routed_experts:
        return "gather"
    return "dense" if has_dense and T <= DENSE_MAX_TOKENS else "capacity"


def grouped_pays(moe: MoE, i: int, T: int, has_dense: bool, kinds: list[str], measured: list) -> bool:
    """Is the grouped path faster than the one `choose_path`'s rules give for T rows of this layer's
    shapes on this host? Each runs as a step runs it (`moe_decode`: routing, its GEMMs in their fastest
    kernels, the elementwise work) on random weights of layer i's shapes, the two taking turns, the
    best of a few rounds; cached per host (`nanoseek.calibrate`). (Timing the expert GEMMs alone favoured
    the dense path, whose rank-counting top-k and E/K x wider activations it left out: on an AVX2 EPYC
    it chose dense at 8 rows, where the grouped step was 1.29x faster.)"""
    cfg = moe.cfg
    E, (_, F2, D) = cfg.n_routed_experts, moe.experts.w13.shape
    rule = choose_path(moe, T, has_dense)
    Fs = moe.shared.w13.weight.shape[0] if moe.shared is not None else 0

    def measure():
        g = torch.Generator().manual_seed(0)
        shapes = {"router": (E, D), "dense_in": (E * F2 + Fs, D), "dense_out": (D, (E * F2 + Fs) // 2),
                  "shared_in": (Fs, D), "shared_out": (D, Fs // 2)}
        lins = {}
        for name, (n, k) in shapes.items():
            if n and k:
                kind = "fp32" if name == "router" else gemm.fastest(torch.device("cpu"), T, k, n, kinds, measured)
                w = (0.05 * torch.randn(n, k, generator=g)).to(gemm.DTYPE[kind])
                lins[f"moe{i}.{name}"] = (w, gemm.pack(w, kind, T), kind)

        def linear(name, x):
            w, pk, kind = lins[name]
            return gemm.linear(x.to(w.dtype), w, pk, kind).float()
        w13, w2 = 0.05 * torch.randn(E, F2, D, generator=g), 0.05 * torch.randn(E, D, F2 // 2, generator=g)
        W = {"grouped": {f"moe{i}.w13": gemm.pack(w13, "panel", T), f"moe{i}.w2": gemm.pack(w2, "panel", T)},
             rule: {f"moe{i}.w13": w13, f"moe{i}.w2": w2}}
        x = torch.randn(T, D, generator=g)
        calls = {path: (lambda path=path: moe_decode(moe, i, x, linear, W[path], path)) for path in W}
        times = dict.fromkeys(calls, float("inf"))
        with torch.no_grad():
            for _ in range(3):
                for path, call in calls.items():
                    times[path] = min(times[path], best_time(call, budget_s=0.005, reps=4))
        return times["grouped"] < times[rule]

    pays, new = remember(torch.device("cpu"), f"moe-grouped|{E}x{cfg.num_experts_per_tok}x{D}x{F2}+{Fs}|{T}|{rule}|"
                         f"{','.join(kinds)}", measure)
    if new:
        measured.append((T, "moe", E, D, F2))
    return bool(pays)


def expert_ranks(flat: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, expert) pairs' experts (P,) -> their one-hot (P, E) and each pair's rank among its
    expert's pairs (P,), in pair order: fixed shapes, no sort (the capacity and grouped paths' layouts)."""
    onehot = F.one_hot(flat, E)
    return onehot, ((onehot.cumsum(0) - 1) * onehot).sum(1)


def grouped_experts(x_TD, weights_TK, idx_TK, p13, p2):
    """The routed experts by the grouped kernel (gemm.grouped_linear): the (token, expert) pairs laid out
    by expert, each expert's rows times its weight packs (`gemm.pack` of the w13 and w2 stacks), then put back
    in pair order, weighted and summed per token. A pair's row is its expert's offset plus its rank among
    that expert's pairs (no sort, no scatter-add: one fused pass each way when compiled). Every shape is
    fixed by T: no capacity, nothing dropped."""
    (T, K), E = idx_TK.shape, p13.shape[0]
    F2, D = 2 * p2.shape[2], p13.shape[2]                   # (the panels pad N, never K)
    flat = idx_TK.reshape(-1)
    onehot, rank = expert_ranks(flat, E)
    counts = onehot.sum(0)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    row = offsets[flat] + rank                                               # each pair's row, by expert
    xs = x_TD.new_empty(T * K, D, dtype=torch.float32).index_put_((row,), x_TD.float().repeat_interleave(K, dim=0))
    gate, up = gemm.grouped_linear(xs, p13, offsets, F2).chunk(2, dim=-1)
    y = gemm.grouped_linear(F.silu(gate) * up, p2, offsets, D)[row]                 # back in pair order
    return (y.view(T, K, D) * weights_TK.unsqueeze(-1)).sum(dim=1).to(x_TD.dtype)


def moe_decode(moe: MoE, i: int, x_TD: torch.Tensor, linear, W: dict, path: str, flags: list | None = None,
               rows_per_expert: int | None = None):
    """x (T, D) fp32 -> (T, D) fp32 by `path` (see choose_path). `linear(name, x)` runs the runner's GEMM
    `name`; W holds the expert stacks `moe{i}.w13` (E, 2F, D) and `moe{i}.w2` (E, D, F).
    The capacity path's rows per expert: `rows_per_expert` (a compiled step's fixed number: pairs past
    it are dropped and the caller must redo the step), or None for the busiest expert's load (read on
    the host: eager). `flags`: a list to which the capacity path appends the busiest expert's load (a
    0-d tensor; a compiled graph cannot branch on it, the caller compares it with the capacity)."""
    T, cfg = x_TD.shape[0], moe.cfg
    E = cfg.n_routed_experts
    logits = linear(f"moe{i}.router", x_TD)                                   # T, E fp32
    if path == "dense":
        F2 = 2 * cfg.moe_intermediate_size
        dense_w = route_dense(logits, moe.gate.bias, cfg)
        h = linear(f"moe{i}.dense_in", x_TD)                                   # T, E*2F (+ 2Fs)
        gate, up = h[:, : E * F2].view(T, E, 2, F2 // 2).unbind(2)
        acts = [(F.silu(gate) * up * dense_w.unsqueeze(-1)).reshape(T, -1)]
        if moe.shared is not None:
            gate, up = h[:, E * F2:].chunk(2, dim=-1)
            acts.append(F.silu(gate) * up)
        return linear(f"moe{i}.dense_out", torch.cat(acts, dim=1))
    weights, idx, _ = route(logits, moe.gate.bias, cfg)
    w13, w2 = W[f"moe{i}.w13"], W[f"moe{i}.w2"]
    if f"moe{i}.w13.scale" in W:     # weight-only fp8: dequantize the stacks (for gather, the chosen experts)
        pick = idx.reshape(-1) if path == "gather" else slice(None)
        w13, w2 = (dequantize(QTensor(W[f"moe{i}.{p}"][pick], W[f"moe{i}.{p}.scale"][pick], WEIGHT), torch.bfloat16)
                   for p in ("w13", "w2"))
        if path == "gather":         # the gathered stacks hold pair k of token t at row t*K + k
            idx = torch.arange(idx.numel(), device=idx.device).view_as(idx)
    if path == "gather":
        out = gather_experts(x_TD, weights, idx, w13, w2)
    elif path == "grouped":                                  # w13, w2: the stacks in panels
        out = grouped_experts(x_TD, weights, idx, w13, w2)
    else:
        onehot, pos = expert_ranks(idx.reshape(-1), E)
        load = onehot.sum(0).max()
        if flags is not None:
            flags.append(load)
        C = rows_per_expert if rows_per_expert is not None else max(8, round8(int(load)))
        out = capacity_experts(x_TD, weights, idx, w13, w2, pos, C)
    if moe.shared is not None:
        gate, up = linear(f"moe{i}.shared_in", x_TD).chunk(2, dim=-1)
        out = out + linear(f"moe{i}.shared_out", F.silu(gate) * up)
    return out


def capacity_experts(x_TD, weights_TK, idx_TK, w13, w2, pos, C: int):
    """Pair p (rank pos[p] among its expert's pairs) goes to row pos[p] of its expert's C rows; pairs
    past C are dropped (an eager caller sizes C so that none is; a compiled one flags the overflow)."""
    (T, D), (E, F2, _), K = x_TD.shape, w13.shape, idx_TK.shape[1]
    slot = torch.where(pos < C, idx_TK.reshape(-1) * C + pos, E * C)          # E*C: a spare zero row
    xs = x_TD.new_zeros(E * C + 1, D, dtype=w13.dtype).index_put(
        (slot,), x_TD.repeat_interleave(K, dim=0).to(w13.dtype))
    hT = torch.bmm(w13, xs[: E * C].view(E, C, D).transpose(1, 2))          # E, 2F, C
    gate, up = hT.split(F2 // 2, dim=1)
    yT = torch.bmm(w2, F.silu(gate) * up).to(x_TD.dtype)                     # E, D, C
    ys = torch.cat([yT.transpose(1, 2).reshape(E * C, D), x_TD.new_zeros(1, D)])[slot]
    return (ys.view(T, K, D) * weights_TK.unsqueeze(-1)).sum(dim=1)
