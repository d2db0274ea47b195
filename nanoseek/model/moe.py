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
  "grouped" - torch._grouped_mm over the segments, forward and backward (`GroupedLinear`): one GEMM
              call per projection whatever the routing (the CPU path, training and prefill)
  "padded"  - every expert's segment zero-padded to the busiest one, two batched matmuls (autograd-
              safe, exact; where a low-precision GEMM plugs in, and on GPUs without grouped GEMMs)
  "loop"    - one matmul pair per non-empty expert (autograd-safe)
  "dense"   - every expert on every token, weights zero off the route: E/K x the FLOPs but ~6 ops,
              which wins for decode-sized T where per-op overhead dominates.
  "gather"  - for a handful of tokens (T*K well below E): gather just the chosen experts' weights and
              run them as one batched matmul (reads K experts per token instead of all E).
The inference runner (`nanoseek/inference/runner/`) adds decode-only paths over weights it derives
from this module (fused router + experts GEMMs, a capacity-padded layout); they are tested against
`moe_reference`, the per-token loop every path here is held to.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import MLP


def gate_choice(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig, top_mask=None):
    """Gate scores (T,E) fp32 and the selection scores with the dropped groups at -inf. `top_mask(x, k)`
    (a boolean mask of the k largest entries along the last dim) replaces torch.topk where given: the
    inference runner passes a topk-free one that fuses under torch.compile."""
    logits = logits_TE.float()
    scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias_E is None else scores + bias_E
    T, E = choice.shape
    G = cfg.n_group
    if cfg.topk_method != "greedy" and G > 1 and cfg.topk_group < G:
        grouped = choice.view(T, G, E // G)
        if cfg.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1) if top_mask is None else \
                (grouped * top_mask(grouped, 2)).sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        if top_mask is None:
            keep = group_score.topk(cfg.topk_group, dim=-1).indices
            dropped = torch.ones(T, G, dtype=torch.bool, device=choice.device).scatter_(1, keep, False)
        else:
            dropped = ~top_mask(group_score, cfg.topk_group)
        choice = choice.masked_fill(dropped.unsqueeze(-1).expand(T, G, E // G).reshape(T, E), float("-inf"))
    return scores, choice


def scale_weights(weights: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig):
    """Gate scores -> (weights (T,K) fp32, expert ids (T,K), scores (T,E) fp32)."""
    scores, choice = gate_choice(logits_TE, bias_E, cfg)
    idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
    return scale_weights(scores.gather(1, idx), cfg), idx, scores


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
            return dense_experts(x_TD, weights_TK, idx_TK, self.w13, self.w2)
        if impl == "gather":
            return gather_experts(x_TD, weights_TK, idx_TK, self.w13, self.w2)
        return sorted_experts(x_TD, weights_TK, idx_TK, self.w13, self.w2, impl)


# The expert computations as functions of the stacked weights w13 (E, 2F, D), w2 (E, D, F), so that
# the inference runner can run them over the copies it keeps (e.g. in bf16).

def gather_experts(x_TD, weights_TK, idx_TK, w13, w2):
    """Gather just the chosen experts' weights and run them as one batched matmul per projection."""
    T, K = idx_TK.shape
    flat = idx_TK.reshape(-1)
    xs = x_TD.repeat_interleave(K, dim=0).unsqueeze(1).to(w13.dtype)            # (T*K, 1, D)
    gate, up = torch.bmm(xs, w13[flat].transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, w2[flat].transpose(1, 2))                   # (T*K, 1, D)
    return (y.view(T, K, -1).to(x_TD.dtype) * weights_TK.unsqueeze(-1).to(x_TD.dtype)).sum(dim=1)


def dense_experts(x_TD, weights_TK, idx_TK, w13, w2):
    """Every expert on every token (batched matmuls), weighted by the routing weights (zero off the route)."""
    T = x_TD.shape[0]
    xs = x_TD.to(w13.dtype)
    gate, up = torch.matmul(xs, w13.transpose(1, 2)).chunk(2, dim=-1)             # E,T,F
    y_ETD = torch.bmm(F.silu(gate) * up, w2.transpose(1, 2)).to(x_TD.dtype)
    dense_w = torch.zeros(T, w13.shape[0], dtype=y_ETD.dtype, device=x_TD.device)
    dense_w.scatter_(1, idx_TK, weights_TK.to(y_ETD.dtype))
    return torch.einsum("etd,te->td", y_ETD, dense_w)


def _mm_t(a, w):
    return torch.matmul(a, w.transpose(-1, -2))


class GroupedLinear(torch.autograd.Function):
    """y = x @ w[e]^T for the rows of each expert segment e: x (M, K) sorted by expert, w (E, N, K),
    offs (E,) int32 the segments' end rows. Backward: dx = g @ w[e] per segment, dw[e] = g_e^T x_e
    (torch._grouped_mm's wgrad form: 2-D x 2-D with the groups along the contraction). PyTorch's own
    derivative of _grouped_mm fails on CPU (torch 2.13), hence this function."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        g = g.contiguous()
        dx = torch._grouped_mm(g, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(g.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run a matmul of x in (x's own outside autocast)."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class RowGather(torch.autograd.Function):
    """y = x[src] with zero rows where src < 0, for a row map whose inverse is known: `back` (R, m) lists
    the y rows each x row went to (-1: none). The backward gathers too, dx[r] = sum_j dy[back[r, j]],
    instead of scatter-adding into x's rows as index_select's backward does (atomic adds: on an H200 the
    MoE's bf16 index_add kernels took 16 of a step's ~220 ms). `src_holes` / `back_holes`: whether the
    map may hold -1s; a map without them is a plain index_select (appending the zero row copies x: 6 ms
    a call for GRPO's 20k-row combine on CPU)."""

    @staticmethod
    def forward(ctx, x, src, back, src_holes: bool = True, back_holes: bool = True):
        ctx.save_for_backward(back)
        ctx.back_holes = back_holes
        return _gather_rows(x, src, src_holes)

    @staticmethod
    def backward(ctx, dy):
        (back,) = ctx.saved_tensors
        R, m = back.shape
        dx = _gather_rows(dy, back.flatten(), ctx.back_holes).view(R, m, -1)
        return (dx.squeeze(1) if m == 1 else dx.sum(dim=1)), None, None, None, None


def _gather_rows(x, src, holes: bool = True):
    """x[src] with zero rows where src < 0 (they read an appended zero row)."""
    if not holes:
        return x.index_select(0, src)
    R = x.shape[0]
    return torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, src.masked_fill(src < 0, R))


def _grouped_swiglu(xs, w13, w2, dt, offs):
    """The experts' SwiGLU over sorted segments ending at `offs`, two grouped GEMMs in dt. CPU: our
    autograd function; CUDA: PyTorch's own derivative of _grouped_mm (what torchtitan uses)."""
    glin = GroupedLinear.apply if xs.device.type == "cpu" else \
        (lambda a, w, o: torch._grouped_mm(a, w.transpose(-2, -1), offs=o))
    with torch.autocast(xs.device.type, enabled=False):
        gate, up = glin(xs, w13.to(dt), offs).chunk(2, dim=-1)
        return glin(F.silu(gate) * up, w2.to(dt), offs)


def sorted_experts(x_TD, weights_TK, idx_TK, w13, w2, impl: str, mm=None, pad_to: int = 32,
                   static_rows: bool | None = None):
    """Pairs sorted by expert, each expert's contiguous segment through its SwiGLU:
    "grouped" one torch._grouped_mm per projection over all segments, forward and backward. Outside
              fp32 on CPU each segment is padded to a multiple of 32 rows: bf16 GEMMs on CPU (oneDNN)
              JIT a kernel per new shape, so segment lengths must recur (measured with routes changing
              every call: 26 ms per call unpadded vs 2 ms with recurring shapes), and grouped GEMMs on
              GPUs want aligned groups. Against "padded", one layer fwd+bwd, 5,120 tokens, 2 cores
              (`bench_train_kernels.py`): the same speed in bf16 with balanced routes, 1.5x faster with
              skewed ones; 1.2x / 1.8x faster in fp32.
    "padded"  every segment zero-padded to the longest one: two batched matmuls, the rows gathered
              in and out as in "grouped" (exact: the padding is as long as the busiest expert needs). The
              padded length is rounded up to a multiple of `pad_to` (recurring shapes, as above; FP8
              asks for whole 128-row groups). Falls back
              to "loop" when padding would more than quadruple the work (a very unbalanced router).
    "loop"    one matmul pair per non-empty expert.
    `static_rows` ("grouped" outside fp32 on CPU; default: off the CPU): the padded layout gets a fixed
    number of rows, the bound T*K + E*(pad_to-1) rounded up to a multiple of pad_to, the slack appended
    to the last expert's segment as zero rows (exact: they contribute nothing), instead of
    its exact length read on the host. The read is a device sync per MoE layer, after which the GPU
    waits on the host's launches of the layer's small ops: an H200's compiled training step (1.71B
    V3-shaped model, B8 x T2048) ran 127 ms of kernels in 139 ms.
    `mm(a, w)` = a @ w^T (batched over experts in "padded") computes the expert GEMMs of "padded" and
    "loop": a low-precision GEMM (nanoseek.quant.fp8) plugs in here from outside."""
    if impl == "grouped" and mm is not None:        # a plugged-in GEMM takes (batched) expert matmuls
        impl = "padded"
    mm = mm or _mm_t
    T, K = idx_TK.shape
    E = w13.shape[0]
    flat = idx_TK.flatten()
    order = flat.argsort(stable=True)                       # (T*K,) pairs sorted by expert
    expert = flat[order]
    token = order // K
    counts = torch.bincount(flat, minlength=E)
    rank = torch.arange(T * K, device=flat.device) - (counts.cumsum(0) - counts)[expert]   # within its segment
    # (index_select below, not x_TD[token]: its backward is an index_add; advanced indexing's backward is
    # an accumulating index_put, which sorts: measured 5 ms per call on a `small` training step)
    C = -(-int(counts.max()) // pad_to) * pad_to if impl == "padded" else 0
    if impl == "padded" and E * C > 4 * T * K:
        impl = "loop"
    dt = matmul_dtype(x_TD) if mm is _mm_t else x_TD.dtype    # (a plugged-in GEMM takes x as it is)
    if impl == "grouped" and dt == torch.float32 and x_TD.device.type == "cpu":      # unpadded segments
        ys = _grouped_swiglu(x_TD.index_select(0, token).to(dt), w13, w2, dt,
                             counts.to(torch.int32).cumsum(0, dtype=torch.int32))
    elif impl in ("grouped", "padded"):
        # every expert's segment padded ("grouped": to a multiple of `pad_to` rows; "padded": all to C
        # rows, one batched matmul); tokens cast before they are copied K times; both row maps gather
        # forward and backward (RowGather), no zero-filled buffer, no scatter-add
        if impl == "grouped":
            sizes = (counts + pad_to - 1) // pad_to * pad_to
            ends = sizes.cumsum(0)
            starts = ends - sizes
            if static_rows is None:
                static_rows = x_TD.device.type != "cpu"
            if static_rows:
                rows = -(-(T * K + E * (pad_to - 1)) // pad_to) * pad_to          # no host sync
                ends = torch.cat([ends[:-1], ends.new_full((1,), rows)])           # slack: last segment
            else:
                rows = int(ends[-1])
        else:
            starts, rows = torch.arange(E, device=flat.device) * C, E * C
        slot = starts[expert] + rank                                        # padded row of each pair
        src = torch.full((rows,), -1, dtype=torch.long, device=flat.device)
        src[slot] = token                                                   # token of each padded row
        pair_slot = torch.empty_like(slot)
        pair_slot[order] = slot                                             # padded row of pair (t, k)
        xs = RowGather.apply(x_TD.to(dt), src, pair_slot.view(T, K), True, False)
        if impl == "grouped":
            ys = _grouped_swiglu(xs, w13, w2, dt, ends.to(torch.int32))
        else:
            gate, up = mm(xs.view(E, C, -1), w13.to(dt)).chunk(2, dim=-1)
            ys = mm(F.silu(gate) * up, w2.to(dt)).reshape(E * C, -1)
        # back to (token, k) order, weighted and summed over k: gathers, no scatter-add
        pair_of_row = torch.full_like(src, -1)
        pair_of_row[pair_slot] = torch.arange(T * K, device=flat.device)
        y_TKD = RowGather.apply(ys, pair_slot, pair_of_row.unsqueeze(1), False, True).view(T, K, -1)
        # elementwise, not a (T,1,K) x (T,K,D) bmm: cuBLAS ran that as 16k tiny GEMMs (2.5 ms per
        # layer on an H200, 8% of a training step)
        return (y_TKD * weights_TK.to(ys.dtype).unsqueeze(2)).sum(dim=1)
    else:
        xs = x_TD.index_select(0, token)
        w13, w2 = w13.to(xs.dtype), w2.to(xs.dtype)
        # unbind once: indexing w13[e] per expert would make autograd build a full-size zero
        # gradient for every slice (measured: 42% of a `small` training step); unbind's backward
        # stacks the per-expert gradients once
        # (the same holds for slicing xs per expert, hence one split)
        w13s, w2s = w13.unbind(0), w2.unbind(0)
        sizes = counts.tolist()
        outs = []
        for e, x_e in enumerate(xs.split(sizes)):
            if sizes[e]:
                gate, up = mm(x_e, w13s[e]).chunk(2, dim=-1)
                outs.append(mm(F.silu(gate) * up, w2s[e]))
        ys = torch.cat(outs) if outs else xs.new_zeros(0, x_TD.shape[1])
    ys = ys * weights_TK.flatten()[order].unsqueeze(1).to(ys.dtype)
    return torch.zeros_like(x_TD, dtype=ys.dtype).index_add_(0, token, ys)


class RoutingRecord:
    """Each MoE layer's (scores (T,E) fp32 with grad, expert ids (T,K)) from one forward, in layer order,
    for balance losses. The caller creates it and passes it down; the model keeps nothing. (An object, not
    a list: FSDP and other wrappers rebuild container arguments, so appends to a list could be lost.)

    `replay`: expert ids (T,K) per MoE layer, in layer order, that the layers use instead of their own
    top-k (routing replay, "R3": RL trains on the experts its sampler chose); -1 rows route freely. The
    routing weights still come from this forward's scores at those experts, so the router learns."""

    def __init__(self, replay: list[torch.Tensor] | None = None, count_changes: bool = False):
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.replay = replay
        self.count_changes = count_changes              # count how often a replay overrode the layer's own
        self.replayed_rows = self.changed_rows = 0      # choice (a host sync per layer: only when asked)

    def add(self, scores: torch.Tensor, idx: torch.Tensor) -> None:
        self.layers.append((scores, idx))

    def replayed(self) -> torch.Tensor | None:
        """The next layer's forced expert ids (the layer about to `add`), or None."""
        if self.replay is None or len(self.layers) >= len(self.replay):
            return None
        return self.replay[len(self.layers)]

    def __iter__(self):
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None
        self.impl: str | None = None     # force "padded" / "loop" / "grouped" / "dense" / "gather"; None: per call
        # Training-time token counts per expert, read and reset by the trainer's bias update.
        self.register_buffer("expert_load", torch.zeros(cfg.n_routed_experts), persistent=False)

    def choose_impl(self, n_tokens: int, grad: bool, dtype: torch.dtype = torch.float32) -> str:
        """The expert path for n_tokens tokens whose expert GEMMs run in `dtype`. On CPU in bf16 the
        grouped GEMM pays one oneDNN call (and a JIT per new segment length) per expert, which loses to
        the padded batch until experts get ~1,000 pairs each. Measured (`bench_train_kernels.py`: 16
        experts top-4, hidden 256, fresh routes every call, forward + backward, 2 cores), grouped/padded
        time in bf16: 1.5x at 64 tokens, 1.2-1.4x at 256, 0.9-1.3x at 1,024, 0.7-1.0x at 5,120; in fp32
        grouped wins at every size (0.5-0.9x)."""
        if self.impl:
            return self.impl
        pairs, E = n_tokens * self.cfg.num_experts_per_tok, self.cfg.n_routed_experts
        if not grad and 2 * pairs <= E:
            return "gather"
        if pairs <= 2 * E:
            return "dense"
        if not grouped_gemm_ok(self.experts.w13, dtype):
            return "padded"
        cpu_low = self.experts.w13.device.type == "cpu" and dtype != torch.float32
        return "padded" if cpu_low and pairs < 1024 * E else "grouped"

    def forward(self, x: torch.Tensor, routing: RoutingRecord | None = None) -> torch.Tensor:
        """`routing`: the caller's record; this layer adds its scores and expert ids to it (and takes
        its replayed expert ids from it, if any)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights, idx, scores = self.gate(x_TD)
        forced = routing.replayed() if routing is not None else None
        if forced is not None:
            forced = forced.to(idx.device)
            if routing.count_changes:
                have = forced[:, 0] >= 0
                changed = (forced.sort(dim=-1).values != idx.sort(dim=-1).values).any(dim=-1) & have
                routing.replayed_rows += int(have.sum())
                routing.changed_rows += int(changed.sum())
            idx = torch.where(forced >= 0, forced, idx)
            weights = scale_weights(scores.gather(1, idx), self.cfg)
        if self.training:
            self.expert_load += torch.bincount(idx.flatten(), minlength=self.expert_load.numel())
        if routing is not None:
            routing.add(scores, idx)
        impl = self.choose_impl(x_TD.shape[0], torch.is_grad_enabled() and x.requires_grad, matmul_dtype(x_TD))
        out = self.experts(x_TD, weights, idx, impl)
        if self.shared is not None:
            out = out + self.shared(x_TD)
        return out.view(shape).to(x.dtype)


def grouped_gemm_ok(w13: torch.Tensor, dtype: torch.dtype) -> bool:
    """torch._grouped_mm can run the expert GEMMs of the stacks w13 (E, 2F, D) in `dtype` here: on any
    CPU, on CUDA from Hopper (sm90) on in bf16, and only when every row of its operands starts on a
    16-byte boundary (D and F times the element size; e.g. a hidden size of 50 in fp32 is refused)."""
    size = torch.tensor([], dtype=dtype).element_size()
    if (w13.shape[-1] * size) % 16 or (w13.shape[-2] // 2 * size) % 16:
        return False
    if w13.device.type == "cpu":
        return True
    return (w13.device.type == "cuda" and torch.cuda.get_device_capability(w13.device) >= (9, 0)
            and dtype == torch.bfloat16)


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
