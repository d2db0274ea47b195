"""DeepSeekMoE: fine-grained routed experts + always-on shared experts (V3 sec. 2.1.2).

Shape legend: T tokens (batch flattened), D hidden, E routed experts, K experts per token,
G groups, F expert width (moe_intermediate_size).

Gate (V3, `topk_method="noaux_tc"`):
    s     = sigmoid(u W_g^T)                       affinities, fp32
    s~    = s + b                                  b = e_score_correction_bias, fp32, selection only
    group score = sum of the top-2 s~ in each of G consecutive expert blocks; keep topk_group groups,
    experts of dropped groups get -inf (the official "fix scores mask"; 0 would let s+b < 0 leak through)
    S     = top-K of the masked s~
    w_e   = s_e / sum_{S} s  (unbiased scores)  * routed_scaling_factor
V2 (`softmax`, `greedy` / `group_limited_greedy`): softmax scores, group score = max, no bias, and
weights are normalised only if norm_topk_prob.
Output: MoE(u) = sum_{e in S} w_e E_e(u) + shared(u), each expert a SwiGLU.

Auxiliary-loss-free balancing: b is nudged after each optimizer step by the trainer (sign rule);
the model only counts tokens per expert (`expert_load`) while training. b never gets a gradient.

Compute: the (token, expert) pairs are sorted by expert so each expert's tokens are contiguous
(the layout expert parallelism's all-to-all and DeepGEMM's grouped kernels use), then
  "loop"    - one matmul pair per non-empty expert (autograd-safe; fastest on CPU for large T)
  "grouped" - torch._grouped_mm over the segments (no grad; CPU forward only supports it)
  "dense"   - every expert on every token, weights zero off the route: E/K x the FLOPs but ~6 ops,
              which wins for decode-sized T where per-op overhead dominates.
  "gather"  - for a handful of tokens (T*K well below E): gather just the chosen experts' weights and
              run them as one batched matmul (reads K experts per token instead of all E).
Inside the inference engine's compiled CPU decode step two more paths run (`MoE._decode`, below):
a fused dense one (router, experts and shared expert as two prepacked GEMMs) and a capacity-padded
one (two batched matmuls, exact fallback on overflow).
`moe_reference` is the per-token loop the tests hold every path to.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import kernels
from .kernels import linear
from .layers import MLP, store_derived


def _gate_choice(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig, rank: bool = False):
    """Gate scores (T,E) fp32 and the selection scores with the dropped groups at -inf. rank=True
    picks the top groups by rank counting (`_top_mask`) instead of topk: same result, fusable."""
    logits = logits_TE.float()
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias_E is None else scores + bias_E
    T, E = choice.shape
    G = cfg.n_group
    if cfg.topk_method != "greedy" and G > 1 and cfg.topk_group < G:
        grouped = choice.view(T, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = (grouped * _top_mask(grouped, 2)).sum(dim=-1) if rank else \
                grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        if rank:
            dropped = ~_top_mask(group_score, cfg.topk_group)
        else:
            keep = group_score.topk(cfg.topk_group, dim=-1).indices
            dropped = torch.ones(T, G, dtype=torch.bool, device=choice.device).scatter_(1, keep, False)
        choice = choice.masked_fill(dropped.unsqueeze(-1).expand(T, G, E // G).reshape(T, E), float("-inf"))
    return scores, choice


def _scale(weights: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig):
    """Gate scores -> (weights (T,K) fp32, expert ids (T,K), scores (T,E) fp32)."""
    scores, choice = _gate_choice(logits_TE, bias_E, cfg)
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    return _scale(scores.gather(1, idx), cfg), idx, scores


def _top_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries along the last dim (ties: lower index first), by counting
    for each entry how many others beat it: (..., n, n) comparisons, one fused kernel under
    torch.compile where topk would be a library call. For small n only."""
    n = x.shape[-1]
    a, b = x.unsqueeze(-1), x.unsqueeze(-2)                    # a: entry i, b: entry j
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)       # j < i
    beats = (b > a) | ((b == a) & lower)
    return beats.sum(dim=-1) < k


def route_dense(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig):
    """`route` without topk, for the compiled decode step: -> routing weights (T,E) fp32, zero off
    the route. Same selection and weights as `route` (up to float ties)."""
    scores, choice = _gate_choice(logits_TE, bias_E, cfg, rank=True)
    return _scale(scores * _top_mask(choice, cfg.num_experts_per_tok), cfg)


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        else:
            self.bias = None

    def forward(self, x_TD: torch.Tensor):
        with torch.autocast(x_TD.device.type, enabled=False):  # router logits in fp32 (pitfall 4)
            logits = F.linear(x_TD.float(), self.weight.float())
        return route(logits, self.bias, self.cfg)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` must not round the selection bias (DeepSeek keeps it fp32).
        bias = self.bias
        super()._apply(fn, recurse)
        if bias is not None and self.bias.dtype != torch.float32:
            self.bias = bias.to(device=self.bias.device, dtype=torch.float32)
        return self


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: w13 (E, 2F, D) = [gate; up], w2 (E, D, F) (HF's fused layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, F_ = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.w13 = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_TD, weights_TK, idx_TK, impl: str):
        if impl == "dense":
            return self._dense(x_TD, weights_TK, idx_TK)
        if impl == "gather":
            return self._gather(x_TD, weights_TK, idx_TK)
        if torch.compiler.is_compiling() and not torch.is_grad_enabled():
            # the sorted paths have data-dependent sizes: inside a compiled graph (the engine's decode
            # step) they run as one opaque op with a static output shape, so the graph stays whole
            return torch.ops.nanoseek.sorted_experts(x_TD, weights_TK, idx_TK, self.w13, self.w2, impl)
        return sorted_experts(x_TD, weights_TK, idx_TK, self.w13, self.w2, impl)

    def _gather(self, x_TD, weights_TK, idx_TK):
        T, K = idx_TK.shape
        flat = idx_TK.reshape(-1)
        xs = x_TD.repeat_interleave(K, dim=0).unsqueeze(1)                        # (T*K, 1, D)
        gate, up = torch.bmm(xs, self.w13[flat].to(xs.dtype).transpose(1, 2)).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, self.w2[flat].to(xs.dtype).transpose(1, 2))   # (T*K, 1, D)
        return (y.view(T, K, -1) * weights_TK.unsqueeze(-1).to(y.dtype)).sum(dim=1)

    def _dense(self, x_TD, weights_TK, idx_TK):
        T = x_TD.shape[0]
        w13, w2 = self.w13.to(x_TD.dtype), self.w2.to(x_TD.dtype)
        gate, up = torch.matmul(x_TD, w13.transpose(1, 2)).chunk(2, dim=-1)    # E,T,F
        y_ETD = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2))
        dense_w = torch.zeros(T, w13.shape[0], dtype=y_ETD.dtype, device=x_TD.device)
        dense_w.scatter_(1, idx_TK, weights_TK.to(y_ETD.dtype))
        return torch.einsum("etd,te->td", y_ETD, dense_w)


def sorted_experts(x_TD, weights_TK, idx_TK, w13, w2, impl: str):
    """Pairs sorted by expert, each expert's contiguous segment through its SwiGLU ("grouped":
    torch._grouped_mm over the segments; "loop": one matmul pair per non-empty expert)."""
    T, K = idx_TK.shape
    flat = idx_TK.flatten()
    order = flat.argsort(stable=True)                       # (T*K,) pairs sorted by expert
    token = order // K
    counts = torch.bincount(flat, minlength=w13.shape[0])
    xs = x_TD[token]
    w13, w2 = w13.to(xs.dtype), w2.to(xs.dtype)
    if impl == "grouped":
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(xs, w13.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
        ys = torch._grouped_mm(F.silu(gate) * up, w2.transpose(-2, -1), offs=offs)
    else:
        # unbind once: indexing w13[e] per expert would make autograd build a full-size zero
        # gradient for every slice (measured: 42% of a `small` training step); unbind's backward
        # stacks the per-expert gradients once
        # (the same holds for slicing xs per expert, hence one split)
        w13s, w2s = w13.unbind(0), w2.unbind(0)
        sizes = counts.tolist()
        outs = []
        for e, x_e in enumerate(xs.split(sizes)):
            if sizes[e]:
                gate, up = (x_e @ w13s[e].T).chunk(2, dim=-1)
                outs.append((F.silu(gate) * up) @ w2s[e].T)
        ys = torch.cat(outs) if outs else xs.new_zeros(0, x_TD.shape[1])
    ys = ys * weights_TK.flatten()[order].unsqueeze(1).to(ys.dtype)
    return torch.zeros_like(x_TD, dtype=ys.dtype).index_add_(0, token, ys)


# the op is defined with torch.library.Library (as nanoseek::packed_linear in kernels.py): cheaper
# to call than @custom_op
_lib = torch.library.Library("nanoseek", "FRAGMENT")
_lib.define("sorted_experts(Tensor x_TD, Tensor weights_TK, Tensor idx_TK, Tensor w13, Tensor w2, str impl) -> Tensor")
_lib.impl("sorted_experts", sorted_experts, "CompositeExplicitAutograd")


@torch.library.register_fake("nanoseek::sorted_experts")
def _(x_TD, weights_TK, idx_TK, w13, w2, impl):
    return torch.empty_like(x_TD)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None
        self.impl: str | None = None     # force "loop" / "grouped" / "dense"; None = choose per call
        # Training-time routing statistics, read and reset by the trainer.
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)
        self.last_scores: torch.Tensor | None = None   # (T,E) fp32 with grad, for balance losses
        self.last_idx: torch.Tensor | None = None

    def choose_impl(self, n_tokens: int, grad: bool) -> str:
        if self.impl:
            return self.impl
        pairs, E = n_tokens * self.cfg.num_experts_per_tok, self.cfg.n_routed_experts
        if not grad and 2 * pairs <= E:
            return "gather"
        if pairs <= 2 * E:
            return "dense"
        if not grad and n_tokens <= 256 and self.experts.w13.device.type == "cpu":
            return "grouped"
        return "loop"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        path = self._decode_path(x_TD)
        if path is not None:
            return self._decode(x_TD, path).view(shape)
        weights, idx, scores = self.gate(x_TD)
        if self.training:
            self.expert_load += torch.bincount(idx.flatten(), minlength=self.expert_load.numel())
            self.last_scores, self.last_idx = scores, idx
        impl = self.choose_impl(x_TD.shape[0], torch.is_grad_enabled() and x.requires_grad)
        out = self.experts(x_TD, weights, idx, impl)
        if self.shared is not None:
            out = out + self.shared(x_TD)
        return out.view(shape).to(x.dtype)

    # ---------------------------------------------------------------------------------------------
    # Compiled decode (fp32 CPU inference inside the engine's torch.compile'd step), two static-shape
    # paths, both with the router and the shared expert's [gate; up] sharing one prepacked GEMM:
    #   fused dense (T <= DENSE_MAX_TOKENS): every routed expert's [gate; up] joins that GEMM too, the
    #     routing weights are folded into the activations (zero off the route), and every down
    #     projection plus the shared one is a second GEMM: E/K x the routed FLOPs in 2 well-shaped
    #     GEMMs, which wins while the step is bound by reading the weights.
    #   capacity (T <= CAPACITY_MAX_TOKENS): each expert gets `capacity(T)` (2x the mean load) rows,
    #     pairs are scattered into an (E, C, D) buffer and the experts run as two batched matmuls with
    #     the weights in their stored layout. If any expert gets more pairs than C (a very unbalanced
    #     router), torch.cond switches that layer to the dense bmm path, so the result is always exact.
    # Thresholds measured on the decode benchmark's model (hidden 256, 16 experts top-4, 2 cores): per
    # compiled MoE layer dense 701 vs capacity 933 us at 16 rows, even at 32, 1364 vs 1157 at 64; whole
    # engine at batch 64 capacity +7.6% (median of 6 interleaved runs). 1-2 rows use "gather" instead.
    DENSE_MAX_TOKENS = 16
    CAPACITY_MAX_TOKENS = 128

    def fused_weights(self):
        """Derived decode weights, recomputed (in place) when a parameter changes:
        W_rs (E + 2Fs, D) router + shared [gate; up]; W_in (E + E*2F + 2Fs, D) and W_out (D, E*F + Fs)
        for the fused dense path."""
        params = [self.gate.weight, self.experts.w13, self.experts.w2] + \
            ([self.shared.w13.weight, self.shared.w2.weight] if self.shared is not None else [])
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        if getattr(self, "_fused_key", None) == key:
            return self._fused
        with torch.no_grad():
            E, F2, D = self.experts.w13.shape
            gate = self.gate.weight.float()
            shared_in = [self.shared.w13.weight.float()] if self.shared is not None else []
            w_in = torch.cat([gate, self.experts.w13.float().reshape(E * F2, D)] + shared_in)
            w_out = torch.cat([self.experts.w2.float().permute(1, 0, 2).reshape(D, -1)] +
                              ([self.shared.w2.weight.float()] if self.shared is not None else []), dim=1)
            store_derived(self, "_fused", (torch.cat([gate] + shared_in), w_in, w_out))
        self._fused_key = key
        return self._fused

    def capacity(self, T: int) -> int:
        """Rows per expert on the capacity path: twice the mean load rounded up to a multiple of 8."""
        mean = T * self.cfg.num_experts_per_tok / self.cfg.n_routed_experts
        return max(8, math.ceil(2 * mean / 8) * 8)

    def _decode_path(self, x_TD) -> str | None:
        # inside the engine's compiled step only (it refreshes the derived weights eagerly before it)
        if not (torch.compiler.is_compiling() and kernels.ENGINE_STEP and not torch.is_grad_enabled()
                and not self.training
                and self.impl is None and x_TD.device.type == "cpu" and x_TD.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and getattr(self, "_fused", None) is not None):
            return None
        T = x_TD.shape[0]
        if self.choose_impl(T, grad=False) == "gather":    # 1-2 rows: reading only the chosen experts wins
            return None                                    # (+15% tokens/s at batch 1 over the dense path)
        return "dense" if T <= self.DENSE_MAX_TOKENS else "capacity" if T <= self.CAPACITY_MAX_TOKENS else None

    def _decode(self, x_TD, path: str):
        T, (E, F2, _) = x_TD.shape[0], self.experts.w13.shape
        w_rs, w_in, w_out = self._fused
        Fs = (w_rs.shape[0] - E) // 2
        if path == "dense":
            h = linear(x_TD, w_in)                                        # T, E + E*2F + 2Fs
            dense_w = route_dense(h[:, :E], self.gate.bias, self.cfg)     # no topk calls: fused
            gate, up = h[:, E: E + E * F2].view(T, E, 2, F2 // 2).unbind(2)
            acts = [(F.silu(gate) * up * dense_w.unsqueeze(-1)).reshape(T, -1)]
            if Fs:
                gate, up = h[:, E + E * F2:].chunk(2, dim=-1)
                acts.append(F.silu(gate) * up)
            return linear(torch.cat(acts, dim=1), w_out)
        h = linear(x_TD, w_rs)                                            # T, E + 2Fs
        weights, idx, _ = route(h[:, :E], self.gate.bias, self.cfg)
        onehot = F.one_hot(idx.reshape(-1), E)                            # T*K, E
        pos = ((onehot.cumsum(0) - 1) * onehot).sum(1)                    # rank of a pair within its expert
        overflow = (onehot.sum(0) > self.capacity(T)).any()
        out = torch.cond(overflow, self._overflow_dense, self._capacity_experts, (x_TD, weights, idx, pos))
        if Fs:
            gate, up = h[:, E:].chunk(2, dim=-1)
            out = out + linear(F.silu(gate) * up, self.shared.w2.weight)
        return out

    def _capacity_experts(self, x_TD, weights_TK, idx_TK, pos):
        (T, D), (E, F2, _), K = x_TD.shape, self.experts.w13.shape, idx_TK.shape[1]
        C = self.capacity(T)
        slot = torch.where(pos < C, idx_TK.reshape(-1) * C + pos, E * C)          # E*C: a spare zero row
        xs = x_TD.new_zeros(E * C + 1, D).index_put((slot,), x_TD.repeat_interleave(K, dim=0))
        hT = torch.bmm(self.experts.w13, xs[: E * C].view(E, C, D).transpose(1, 2))  # E, 2F, C
        gate, up = hT.split(F2 // 2, dim=1)
        yT = torch.bmm(self.experts.w2, F.silu(gate) * up)                        # E, D, C
        ys = torch.cat([yT.transpose(1, 2).reshape(E * C, D), x_TD.new_zeros(1, D)])[slot]
        return (ys.view(T, K, D) * weights_TK.unsqueeze(-1)).sum(dim=1)

    def _overflow_dense(self, x_TD, weights_TK, idx_TK, pos):
        return self.experts._dense(x_TD, weights_TK, idx_TK)


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token, per-expert loop: the slow obvious definition the fast paths are tested against."""
    x_TD = x.reshape(-1, x.shape[-1]).float()
    weights, idx, _ = moe.gate(x_TD)
    out = torch.zeros_like(x_TD)
    w13, w2 = moe.experts.w13.float(), moe.experts.w2.float()
    for t in range(x_TD.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            gate, up = (w13[e] @ x_TD[t]).chunk(2)
            out[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
        if moe.shared is not None:
            out[t] += _mlp_ref(moe.shared, x_TD[t])
    return out.view(x.shape)


def _mlp_ref(mlp: MLP, x_D: torch.Tensor) -> torch.Tensor:
    gate, up = (mlp.w13.weight.float() @ x_D).chunk(2)
    return mlp.w2.weight.float() @ (F.silu(gate) * up)


# ------------------------------------------------------------------------------------------------
# Load balancing (training only). See the V3 report sec. 2.1.2 / 4.3-4.4 and arXiv 2408.15664.

@torch.no_grad()
def update_bias(moe: MoE, gamma: float) -> torch.Tensor:
    """Auxiliary-loss-free balancing, after each optimizer step: b_i += gamma * sign(mean load - load_i).

    Overloaded experts become less likely to be *selected*; their weights are untouched (the bias is
    never part of the gate weights) and b gets no gradient. Returns the load that was used, then
    resets the counts for the next step.
    """
    load = moe.expert_load.clone()
    if moe.gate.bias is not None and gamma > 0 and load.sum() > 0:
        moe.gate.bias += gamma * torch.sign(load.mean() - load).to(moe.gate.bias.device)
    moe.expert_load.zero_()
    return load


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (0 = perfectly balanced)."""
    mean = load.float().mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0


def balance_loss(scores_TE: torch.Tensor, idx_TK: torch.Tensor, n_seq: int, per_sequence: bool = True):
    """Sum_i f_i P_i (times alpha by the caller), averaged over sequences.

    f_i = E / (K T) * #tokens routed to i,  P_i = mean_t s'_{i,t} with s' = s / sum_j s_j (scores
    renormalised over all experts). per_sequence=True is V3's complementary sequence-wise loss (eqs.
    17-20); False treats the whole batch as one sequence - the classic auxiliary loss used for the
    ablation. f uses the actual (bias-influenced) selection, as most implementations do.
    """
    T_all, E = scores_TE.shape
    K = idx_TK.shape[1]
    groups = n_seq if per_sequence else 1
    s = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    P = s.view(groups, -1, E).mean(dim=1)                                        # (S, E)
    counts = torch.zeros(groups, E, device=scores_TE.device)
    counts.scatter_add_(1, idx_TK.view(groups, -1), torch.ones(groups, idx_TK.numel() // groups,
                                                                device=scores_TE.device))
    f = counts * E / (K * (T_all // groups))
    return (f * P).sum(dim=-1).mean()
