"""DeepSeek-V3's fine-grained FP8, from quantization to a training linear (V3 report sec. 3.3).

FP8 in one page
---------------
E4M3 (`torch.float8_e4m3fn`) keeps 4 significant bits and a range of +-448. A tensor goes to FP8 in
groups that share one fp32 scale:

    scale = max(amax(group), 1e-4) / 448          (optionally rounded up to a power of two: "UE8M0")
    q     = e4m3(clamp(x / scale, -448, 448))     round to nearest even
    x^    = q * scale                             what the GEMM effectively multiplies

The smaller the group, the less one outlier costs its neighbours. V3's groups:

    activations, and activation gradients   1 x 128   per token, per 128 channels ("tiles")
    weights                                 128 x 128 ("blocks"), so W and W^T share one quantization
    the weight-gradient GEMM's inputs       128 x 1   it contracts over tokens, and a scale group must
                                                      not straddle the contraction: the saved 1x128
                                                      activation is dequantized and re-tiled 128x1

so a linear y = x W^T runs its three GEMMs on FP8 operands, all E4M3:

    fprop   y  = x^(1x128)  . W^(128x128)^T
    dgrad   dx = dy^(1x128) . W^(128x128)           (the same quantized W, transposed)
    wgrad   dW = dy^(128x1)^T . x^(128x1)           fp32 result (master weights and grads stay fp32)

A GEMM over quantized operands is sum_b s_a[m,b] s_b[n,b] sum_{k in block b} q_a[m,k] q_b[n,k]: the
scales apply per 128-wide slice of K, which is why Hopper kernels "promote" the tensor cores' partial
sums to fp32 every 128 elements of K. Tails (dimensions not divisible by 128) form groups as wide as
the tail - what zero-padding the last group to 128 gives, since zeros change neither an amax nor a
product - and are never rejected.

Backends (`Recipe.backend`):
  emulate    exact emulation on any device: dequantize the FP8 operands to fp32 and multiply in fp32
             (fp32 accumulation throughout - at least as precise as promotion every 128). CPU runs
             and every test use it; it defines the numerics the CUDA kernels are checked against.
  blockwise  CUDA sm90: `F.scaled_mm` with `BlockWise1x128` / `BlockWise128x128` scales (DeepSeek's
             recipe in cuBLAS).
  rowwise    CUDA sm89+: `torch._scaled_mm` with one scale per row: the fine-grained operands are
             re-quantized per row (a coarser recipe, named in the log when it is used).
  auto       blockwise, else rowwise, else emulate. The first use of a CUDA kernel for each operand
             layout is checked against the emulation on the real operands; a kernel that fails or
             disagrees is not used again in this process (one warning says which and why).

What stays in high precision (as in V3): embedding, output head, router, norms, the attention core
(softmax(QK^T)V) and the MTP module's projection; `convert()` applies FP8 to every other linear of
the transformer blocks (attention projections, dense and shared FFNs, routed experts) from outside
the model, keeping the parameters (fp32 masters) and the state-dict names unchanged.

Not modelled: the E5M6 cache of the attention-output activation and FP8 MoE dispatch (both are
memory / communication formats for multi-GPU training).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..common import UserError, print0
from ..model.moe import Experts, matmul_dtype, sorted_experts

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
TILE = 128
ACT = (1, TILE)           # activations and activation gradients
WEIGHT = (TILE, TILE)     # weights
COL = (TILE, 1)           # the weight-gradient GEMM's operands (contraction over tokens)
BACKENDS = ("auto", "emulate", "blockwise", "rowwise")
SCALE_FORMATS = ("fp32", "ue8m0")        # fp32 scales, or UE8M0 (powers of two)


@dataclass(frozen=True)
class Recipe:
    pow2_scales: bool = False      # UE8M0: scales rounded up to powers of two (V3.1-style)
    backend: str = "auto"
    fused: bool = False            # quantize with the compiled one-pass kernels (opt-in: see `quantize`)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"FP8 backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")


class QTensor(NamedTuple):
    """q (..., R, C) e4m3 and scale (..., ceil(R/br), ceil(C/bc)) fp32 for groups of `block` = (br, bc)."""
    q: torch.Tensor
    scale: torch.Tensor
    block: tuple[int, int]

    @property
    def T(self) -> "QTensor":
        """The transpose: the same numbers, groups transposed with it."""
        return QTensor(self.q.transpose(-1, -2), self.scale.transpose(-1, -2), self.block[::-1])


def _grid(R: int, C: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-R // block[0]), -(-C // block[1])


def _pieces(R: int, C: int, block: tuple[int, int]):
    """Split an (R, C) matrix into at most four rectangles that each hold whole groups: the part
    divisible by the block, and the row / column tails (whose groups are as wide as the tail), so
    that every rectangle is a view (..., rows/gr, gr, cols/gc, gc) and nothing needs padding.
    Yields (row slice, col slice, (gr, gc), grid row slice, grid col slice)."""
    def split(n, b):
        main = n - n % b
        out = [(slice(0, main), b, slice(0, main // b))] if main else []
        if n % b:
            out.append((slice(main, n), n - main, slice(main // b, main // b + 1)))
        return out
    for rs, gr, grs in split(R, block[0]):
        for cs, gc, gcs in split(C, block[1]):
            yield rs, cs, (gr, gc), grs, gcs


def _grouped(t: torch.Tensor, rs: slice, cs: slice, g: tuple[int, int]) -> torch.Tensor:
    piece = t[..., rs, cs]
    return piece.view(*piece.shape[:-2], piece.shape[-2] // g[0], g[0], piece.shape[-1] // g[1], g[1])


def quantize(x: torch.Tensor, block: tuple[int, int], pow2: bool = False, fused: bool = False) -> QTensor:
    """x (..., R, C) -> E4M3 with one fp32 scale per `block` of the last two dims. `fused` (1x128 tiles
    and 128x128 blocks) runs the same arithmetic, bit for bit, compiled into one or two kernels per call
    (`_fused_quantizer`); the reference below takes ~6 passes over fp32 copies. Measured on an H200
    (torch 2.11, `benchmarks/gpu_fp8.py`): a 8192 x 7168 bf16 activation in 0.47 ms fused vs 0.79 ms;
    but a whole FP8 training step took 4.2 s fused (kernel time 105 ms: the rest is host-side, not
    yet diagnosed) against 0.29 s with the reference quantizers (commit 7b8ba42), hence opt-in
    (`Recipe(fused=True)`)."""
    if fused and block in (ACT, WEIGHT) and x.numel():
        return QTensor(*_fused_quantizer(block)(x, pow2), block)
    *lead, R, C = x.shape
    nr, nc = _grid(R, C, block)
    if R == 0 or C == 0:                  # e.g. no token routed anywhere: nothing to scale
        return QTensor(torch.empty(x.shape, dtype=E4M3, device=x.device),
                       torch.ones(*lead, nr, nc, device=x.device), block)
    xf = x.float().contiguous()
    scaled = torch.empty_like(xf)
    scale = torch.empty(*lead, nr, nc, device=x.device)
    for rs, cs, g, grs, gcs in _pieces(R, C, block):
        groups = _grouped(xf, rs, cs, g)
        # max |x| as max(max x, -min x): two reads and no |x| temporary (bit-identical; the whole call
        # 27-29 vs 36-48 ms for 4096 x 2048 bf16 tiles on this project's Xeon, bench_fp8_quantize.py)
        s = torch.maximum(groups.amax(dim=(-3, -1)), groups.amin(dim=(-3, -1)).neg_()).clamp_(min=AMAX_FLOOR).div_(E4M3_MAX)
        if pow2:
            s = torch.exp2(torch.ceil(torch.log2(s)))
        scale[..., grs, gcs] = s
        torch.div(groups, s[..., :, None, :, None], out=_grouped(scaled, rs, cs, g))
    return QTensor(scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale, block)


def _whole_groups(x: torch.Tensor, block: tuple[int, int], pow2: bool):
    """`quantize`'s arithmetic in one expression for the compiler: tails zero-padded to whole groups
    (which is what a tail group means: zeros change no amax), then cut off again."""
    *lead, R, C = x.shape
    br, bc = block
    xf = F.pad(x.float(), (0, (-C) % bc, 0, (-R) % br))
    g = xf.reshape(*lead, xf.shape[-2] // br, br, xf.shape[-1] // bc, bc)
    s = g.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR).div(E4M3_MAX)
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = torch.div(g, s[..., :, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).reshape(xf.shape)
    return q[..., :R, :C].contiguous(), s


# one function per operand kind, so that each compiles on its own (dynamo counts recompiles per function)
def _act_tiles(x: torch.Tensor, pow2: bool):
    return _whole_groups(x, ACT, pow2)


def _weight_blocks(x: torch.Tensor, pow2: bool):
    return _whole_groups(x, WEIGHT, pow2)


def _transposed_tiles(x: torch.Tensor, pow2: bool):
    return _whole_groups(x.mT, ACT, pow2)


def _retile_transposed(q: torch.Tensor, scale: torch.Tensor, pow2: bool):
    """The weight-gradient GEMM's x operand from the saved FP8 activation: dequantize its 1x128 tiles,
    transpose, re-quantize in 1x128 tiles of x^T (= 128x1 tiles of x), in one pass when compiled."""
    K = q.shape[-1]
    xf = F.pad(q.float(), (0, (-K) % TILE)).unflatten(-1, (-1, TILE)).mul(scale[..., None]).flatten(-2)[..., :K]
    return _whole_groups(xf.mT, ACT, pow2)


@functools.cache
def _compiled(fn):
    """fn compiled once per process with dynamic shapes (token counts change from call to call), called
    with plain tensors (parameters get static-shape guards: one recompile per weight shape) and autocast
    off (forward runs under autocast, backward outside: a recompile each way otherwise). Every dim is
    marked unbacked: with plain dynamic sizes dynamo guards on whether a dim holds one group and whether
    it has a tail (`[..., :C]` a no-op or not), so each new kind of shape compiled a new graph (6 operand
    shapes: 18 graphs, 180 s on 2 CPU cores), and a model's many weight shapes could reach dynamo's
    recompile limit. Unbacked, it is one graph per function, rank, dtype and scale format."""
    compiled = torch.compile(fn, dynamic=True)

    def call(*args):
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        for a in args:
            if isinstance(a, torch.Tensor):
                for d in range(a.dim()):
                    torch._dynamo.decorators.mark_unbacked(a, d)
        with torch.autocast(args[0].device.type, enabled=False):
            return compiled(*args)
    return call


def _fused_quantizer(block: tuple[int, int]):
    return _compiled(_act_tiles if block == ACT else _weight_blocks)


def quantize_transposed(x: torch.Tensor, pow2: bool = False, fused: bool = False) -> QTensor:
    """x^T (..., C, R) in 1x128 tiles (= x in 128x1 tiles, transposed), written contiguous: the
    weight-gradient GEMM's dy operand."""
    if fused and x.numel():
        return QTensor(*_compiled(_transposed_tiles)(x, pow2), ACT)
    # 128x1 groups of x, transposed as a view: the same bits as quantizing a transposed copy in 1x128
    # tiles, and 2x faster on CPU (a GEMM kernel that needs it contiguous copies 1-byte values then)
    return quantize(x, COL, pow2).T


def retile_transposed(t: QTensor, pow2: bool = False, fused: bool = False) -> QTensor:
    """x^T quantized in 1x128 tiles from x's 1x128-tiled FP8 `t` (the saved activation, for wgrad)."""
    if fused and t.q.numel():
        return QTensor(*_compiled(_retile_transposed)(t.q, t.scale, pow2), ACT)
    return quantize(dequantize(t), COL, pow2).T


def e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """q.float(), faster on CPU: torch converts e4m3 element by element there (7.1 ms for 2.6M values on
    this project's Xeon), a lookup in the 256-entry table of every e4m3 value takes 1.9 ms."""
    if q.device.type != "cpu":
        return q.float()
    table = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    return table.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


def dequantize(t: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values the FP8 operand stands for: q * its group's scale."""
    q, scale, block = t
    if not q.is_contiguous() and q.transpose(-1, -2).is_contiguous():     # a transposed operand: no copy
        return dequantize(t.T, dtype).transpose(-1, -2)
    *lead, R, C = q.shape
    xf = e4m3_to_float(q.contiguous())
    for rs, cs, g, grs, gcs in _pieces(R, C, block):
        piece = _grouped(xf, rs, cs, g)
        piece.mul_(scale[..., grs, gcs][..., :, None, :, None])
    return xf.to(dtype)


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepGEMM's test metric 1 - 2<x,y> / (|x|^2 + |y|^2): 0 for equal tensors, ~7e-4 for plain FP8 noise."""
    x, y = x.detach().double(), y.detach().double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


# -------------------------------------------------------------------------------------------------
# GEMMs over quantized operands: a (..., M, K) x b (..., N, K) -> (..., M, N)

def matmul(a: QTensor, b: QTensor, out_dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """sum over K of a^[m,k] b^[n,k], each operand with its own groups along K."""
    if a.q.device.type == "cuda" and backend != "emulate":
        y = _cuda_matmul(a, b, out_dtype, backend)
        if y is not None:
            return y
    return emulated_matmul(a, b, out_dtype)


def emulated_matmul(a: QTensor, b: QTensor, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.matmul(dequantize(a), dequantize(b).transpose(-1, -2)).to(out_dtype)


# Which CUDA kernels passed their first-use check in this process, per (device, kernel, operand
# groups, whether the operands are batched): a record of what the hardware and this torch build can
# do, like torch's own backend flags. Batched (expert) operands lay out their scales differently, so
# they get their own check.
_CUDA_OK: dict[tuple, bool] = {}


def _cuda_matmul(a: QTensor, b: QTensor, out_dtype, backend: str) -> torch.Tensor | None:
    kinds = ["blockwise", "rowwise"] if backend == "auto" else [backend]
    for kind in kinds:
        key = (a.q.device.index, kind, a.block, b.block, a.q.dim() > 2 or b.q.dim() > 2)
        if _CUDA_OK.get(key) is False:
            continue
        try:
            y = _KERNELS[kind](a, b, out_dtype)
        except Exception as e:                  # unsupported layout / GPU: fall back, once, loudly
            _CUDA_OK[key] = False
            warnings.warn(f"nanoseek fp8: {kind} scaled_mm unavailable for {a.block}x{b.block} operands "
                          f"({type(e).__name__}: {str(e)[:160]}); falling back", stacklevel=3)
            continue
        if key not in _CUDA_OK:
            ref = emulated_matmul(a, b, torch.float32)
            # the kernels see the same FP8 operands: only accumulation order differs (rowwise re-quantizes)
            tol = 1e-5 if kind == "blockwise" else 5e-3
            diff = calc_diff(y.float(), ref)
            _CUDA_OK[key] = diff < tol
            if not _CUDA_OK[key]:
                warnings.warn(f"nanoseek fp8: {kind} scaled_mm disagrees with the emulation for {a.block}x"
                              f"{b.block} operands (calc_diff {diff:.2e}); not using it", stacklevel=3)
                continue
            if kind != "blockwise":
                warnings.warn(f"nanoseek fp8: using the {kind} recipe for {a.block}x{b.block} GEMMs "
                              "(blockwise is unavailable here)", stacklevel=3)
        return y
    return None


def _batched(kernel, a: QTensor, b: QTensor, out_dtype) -> torch.Tensor:
    """A 2-D kernel over operands with (broadcast) leading dims, one matrix pair at a time."""
    if a.q.dim() == 2 and b.q.dim() == 2:
        return kernel(a, b, out_dtype)
    lead = torch.broadcast_shapes(a.q.shape[:-2], b.q.shape[:-2])

    def matrices(t: QTensor) -> list[QTensor]:
        q, s = (x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:]) for x in (t.q, t.scale))
        return [QTensor(qi, si, t.block) for qi, si in zip(q, s)]
    ys = [kernel(x, w, out_dtype) for x, w in zip(matrices(a), matrices(b))]
    return torch.stack(ys).view(*lead, a.q.shape[-2], b.q.shape[-2])


def _pad_q(q: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad FP8 matrices (..., R, C) (bit pattern 0 is +0.0) to (..., rows, cols), contiguous."""
    R, C = q.shape[-2:]
    if (R, C) == (rows, cols):
        return q.contiguous()
    return F.pad(q.contiguous().view(torch.uint8), (0, cols - C, 0, rows - R)).view(E4M3)


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def _blockwise(a: QTensor, b: QTensor, out_dtype) -> torch.Tensor:
    """cuBLAS's DeepSeek recipe: a in 1x128 tiles, b in 128x128 blocks or 1x128 tiles, scales MN-major.
    Leading (expert) dims: operands and scales are padded and laid out once for all matrices, then one
    2-D `scaled_mm` per matrix pair (torch has no blockwise grouped kernel on sm90)."""
    st = F.ScalingType
    if a.block != ACT or b.block not in (ACT, WEIGHT):
        raise NotImplementedError(f"operand groups {a.block} x {b.block}")
    M, K = a.q.shape[-2:]
    N = b.q.shape[-2]
    Mp, Kp = _round(M, 16), _round(K, TILE)
    Np = _round(N, TILE if b.block == WEIGHT else 16)
    qa, qb = _pad_q(a.q, Mp, Kp), _pad_q(b.q, Np, Kp)
    sa = F.pad(a.scale, (0, Kp // TILE - a.scale.shape[-1], 0, Mp - M), value=1.0).mT.contiguous().mT
    if b.block == WEIGHT:
        # 128x128 blocks: the scales in b^T's orientation, (K/128 rounded up to 4, N/128), K-major
        # (measured on an H200, torch 2.11: "scale_b must have shape 56 x 288" for N 36864, K 7168)
        L4 = _round(Kp // TILE, 4)
        sb = F.pad(b.scale, (0, L4 - b.scale.shape[-1], 0, Np // TILE - b.scale.shape[-2]), value=1.0).contiguous().mT
    else:             # 1x128 tiles: (N, K/128), N-major, like a's
        sb = F.pad(b.scale, (0, Kp // TILE - b.scale.shape[-1], 0, Np - b.scale.shape[-2]), value=1.0).mT.contiguous().mT

    def gemm(qa, qb, sa, sb):
        return F.scaled_mm(qa, qb.t(), sa, st.BlockWise1x128, sb,
                           st.BlockWise128x128 if b.block == WEIGHT else st.BlockWise1x128,
                           swizzle_a=F.SwizzleType.NO_SWIZZLE, swizzle_b=F.SwizzleType.NO_SWIZZLE,
                           output_dtype=out_dtype)
    if qa.dim() == 2 and qb.dim() == 2:
        return gemm(qa, qb, sa, sb)[:M, :N]
    lead = torch.broadcast_shapes(qa.shape[:-2], qb.shape[:-2])
    flat = [x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:]) for x in (qa, qb, sa, sb)]
    y = torch.stack([gemm(*xs) for xs in zip(*flat)])
    return y.view(*lead, Mp, -1)[..., :M, :N]


def _rowwise(a: QTensor, b: QTensor, out_dtype) -> torch.Tensor:
    """One scale per row of a and per row of b (torch._scaled_mm's rowwise kernel)."""
    M, K = a.q.shape
    N = b.q.shape[0]
    Kp, Np = _round(K, 16), _round(N, 16)
    ra = quantize(F.pad(dequantize(a), (0, Kp - K)), (1, Kp))
    rb = quantize(F.pad(dequantize(b), (0, Kp - K, 0, Np - N)), (1, Kp))
    y = torch._scaled_mm(ra.q, rb.q.t(), scale_a=ra.scale.contiguous(), scale_b=rb.scale.t().contiguous(),
                         out_dtype=out_dtype)
    return y[:, :N]


_KERNELS = {"blockwise": _blockwise, "rowwise": functools.partial(_batched, _rowwise)}


# -------------------------------------------------------------------------------------------------
# the training GEMM: y = x @ w^T with all three GEMMs on FP8 operands

class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, recipe: Recipe, out_dtype: torch.dtype):
        xq = quantize(x, ACT, recipe.pow2_scales, recipe.fused)
        wq = quantize(w, WEIGHT, recipe.pow2_scales, recipe.fused)
        ctx.save_for_backward(xq.q, xq.scale, wq.q, wq.scale)    # FP8 activations for backward
        ctx.recipe, ctx.dtypes = recipe, (x.dtype, w.dtype)
        return matmul(xq, wq, out_dtype, recipe.backend)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        r = ctx.recipe
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = matmul(quantize(dy, ACT, r.pow2_scales, r.fused), QTensor(wq, ws, WEIGHT).T, ctx.dtypes[0], r.backend)
        if ctx.needs_input_grad[1]:
            # 128x1 tiles of dy and x are 1x128 tiles of their transposes: quantized transposed, the
            # operands come out contiguous in the layout the GEMM reads
            x_cols = retile_transposed(QTensor(xq, xs, ACT), r.pow2_scales, r.fused)     # x^T (..., K, M)
            dy_cols = quantize_transposed(dy, r.pow2_scales, r.fused)                    # dy^T (..., N, M)
            dw = matmul(dy_cols, x_cols, torch.float32, r.backend)                       # (..., N, K)
            if wq.dim() == 2 and dw.dim() > 2:
                dw = dw.sum(dim=tuple(range(dw.dim() - 2)))
            dw = dw.to(ctx.dtypes[1])
        return dx, dw, None, None


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, recipe: Recipe = Recipe()) -> torch.Tensor:
    """x (..., M, K) @ w(..., N, K)^T on FP8 operands (fprop, dgrad, wgrad). The output takes the
    autocast dtype when autocast is on, else x's dtype."""
    return _FP8Matmul.apply(x, w, recipe, matmul_dtype(x))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, recipe: Recipe = Recipe()) -> torch.Tensor:
    """F.linear(x, w) (no bias) with x (..., K), w (N, K), on FP8 operands."""
    y = fp8_matmul(x.reshape(-1, x.shape[-1]), w, recipe)
    return y.view(*x.shape[:-1], w.shape[0])


# -------------------------------------------------------------------------------------------------
# applying it to a model from outside

class FP8Linear(nn.Linear):
    """An nn.Linear whose GEMMs run on FP8 operands. Same parameters (fp32 masters), same names."""
    recipe: Recipe

    @classmethod
    def wrap(cls, lin: nn.Linear, recipe: Recipe) -> "FP8Linear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = lin.in_features, lin.out_features
        new.weight, new.bias = lin.weight, lin.bias
        new.recipe = recipe
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.recipe)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.recipe}"


class FP8Experts(Experts):
    """Routed experts whose grouped GEMMs run on FP8 operands (the sorted, padded per-expert layout;
    FP8 groups never cross an expert, as in DeepGEMM's contiguous layout)."""
    recipe: Recipe

    @classmethod
    def wrap(cls, experts: Experts, recipe: Recipe) -> "FP8Experts":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.w13, new.w2 = experts.w13, experts.w2
        new.recipe = recipe
        return new

    def forward(self, x_TD, weights_TK, idx_TK, impl: str):
        mm = functools.partial(fp8_matmul, recipe=self.recipe)
        # fused quantizers: segments padded to whole 128-row groups, so the wgrad GEMM's 1x128 tiles along
        # tokens never need a tail and the compiled kernels see one shape family as loads change (the
        # reference path pads to 32 rows: on CPU the padding is real work, ~10% of a `small` FP8 step)
        return sorted_experts(x_TD, weights_TK, idx_TK, self.w13, self.w2, "padded", mm=mm,
                              pad_to=TILE if self.recipe.fused else 32)


def swap_block_modules(model: nn.Module, replace) -> int:
    """Replace, in every transformer block (main and MTP), each child for which `replace(child)` returns
    a module; returns how many. Embedding, head, final norm and the MTP projection are outside blocks."""
    n = 0
    for block in model.blocks():
        for parent in block.modules():
            for name, child in list(parent.named_children()):
                new = replace(child)
                if new is not None:
                    setattr(parent, name, new)
                    n += 1
    return n


def convert(model: nn.Module, recipe: Recipe | None = None) -> int:
    """Swap the eligible linears and routed experts of every transformer block (main and MTP) for FP8
    ones, in place, sharing their parameters; returns how many modules were converted (0 on a model
    converted already). The embedding, output head, router, norms, the attention core and the MTP
    projection are left alone."""
    recipe = recipe or Recipe()

    def replace(child):
        if type(child) is nn.Linear:
            return FP8Linear.wrap(child, recipe)
        if type(child) is Experts:
            return FP8Experts.wrap(child, recipe)
        return None
    return swap_block_modules(model, replace)


def enable_training(model: nn.Module, scales: str = "fp32") -> int:
    """`--fp8` of the trainers: convert a nanoseek model and say once what runs in FP8 and how."""
    if scales not in SCALE_FORMATS:
        raise UserError(f"--fp8-scales {scales!r}: choose one of {', '.join(SCALE_FORMATS)}")
    if not hasattr(model, "layers") or not hasattr(model, "moe_layers"):
        raise UserError("--fp8 applies DeepSeek's FP8 recipe to nanoseek (DeepSeek-V3-format) models; this model "
                        f"is a {type(model).__name__}. Drop --fp8 or convert the model first")
    n = convert(model, Recipe(pow2_scales=scales == "ue8m0"))
    dev = next(model.parameters()).device
    where = ("CUDA scaled_mm (blockwise, checked against the emulation on first use)" if dev.type == "cuda"
             else "exact emulation on this CPU (fp32 GEMMs on the FP8 operands; numerics, not speed)")
    print0(f"fp8: {n} modules (block linears, routed experts) run fprop, dgrad and wgrad on E4M3 operands with "
           f"{scales} scales; embedding, head, router, norms and attention core stay high precision; {where}")
    return n
