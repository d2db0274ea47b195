"""The decode step's GEMM kernels, on weights the runner packs ahead of time.

A decode step multiplies a few rows (the batch) by every weight matrix. Which kernel is fastest
depends on the host and on the shape; measured on one 2-core Xeon with AMX (us per call):

    rows x K x N        fp32 F.linear   fp32 MKL-packed   bf16 F.linear   bf16 oneDNN-packed
    8 x 256 x 4096          149              70               85               43
    8 x 256 x 208            10              10               27               25
    64 x 1024 x 256         147             117               59               41

so small GEMMs want fp32 (bf16 calls carry ~20 us of fixed cost there) and large ones bf16, while
on an AMD host without AMX the MKL packs did not pay at all. On an AVX2-only AMD EPYC (no avx512,
so no bf16 kernels worth having: bf16 F.linear ran at a quarter of fp32's speed) MKL's fp32 GEMMs
were slow at a few rows and oneDNN's own fp32 kernels on a packed weight won (best of 3 x 50
calls, us per call, 2026-11-27):

    rows x K x N        fp32 F.linear   fp32 MKL-packed   fp32 oneDNN-packed
    8 x 256 x 4096          402             373              213
    64 x 256 x 4096        2794            2933             1109
    8 x 1024 x 256          150              87               76

At 1-8 rows every library kernel there did worse than the weight's size suggests (MKL's sgemm runs
2 x 256 x 4096 at 2x its 1-row time), so the runner has its own: fp32 on the weight packed in 16-column
panels, AVX2 tiles of 8 accumulators, 4 rows x 16 columns, 2 x 32 or 1 x 64 (`packed_linear.cpp`). Same
host, the kernels taking turns, best of 7 rounds, us per call (`benchmarks/bench_decode_gemm.py`):

    rows x K x N        fp32 F.linear   fp32 MKL-packed   fp32 oneDNN-packed   fp32 panel
    1 x 256 x 4096          124             107               94                  71
    2 x 256 x 4096          270             226              123                  96
    2 x 128 x 768            32              36               47                  15
    4 x 1024 x 256          139              98               93                  54
    8 x 256 x 4096          685             618              366                 367
    1 x 128 x 112           4.6             9.6               43                 7.0

The runner therefore picks a kernel per (weight, row count) by timing the candidates
(`nanoseek.calibrate`, cached per host).

    KINDS      fp32     F.linear in fp32
               mkl      fp32 on an MKL-packed weight (`torch.ops.mkl`); a pack serves one row count
               bf16     F.linear in bf16
               onednn   bf16 on a oneDNN-blocked weight (`torch.ops.mkldnn`); one pack serves all
               onednn32 fp32 on a oneDNN-blocked weight (the same op, oneDNN's fp32 kernels)
               panel    fp32 on the weight in 16-column panels, nanoseek's AVX2 kernel (x86-64 CPUs with
                        AVX2 and FMA, where packed_linear.cpp builds); one pack serves all row counts
               fp8      weight-only FP8 (`LLM(weights="fp8")`): the weight stays e4m3 with 128x128 block
                        scales (its "pack") and is dequantized to bf16 per GEMM - half the weight memory
                        of bf16, for a dequantization pass per GEMM
    pack(w, kind, rows)        the packed tensor for that kernel (None for the plain kinds)
    linear(x, w, packed, kind) y = x @ w.T in the kernel's dtype; the caller casts around it
    grouped_linear(x, packs, offsets, n)   a MoE layer's routed experts in one call: rows sorted by
                               expert, each times its expert's weight in panels (`pack` of the stack); the panel
                               kernel's tiles per expert (runner/moe.py's grouped path)

Nothing here holds state: the runner makes the packs (in `sync_weights`), owns them and passes them
to the step as ordinary inputs. `nanoseek::packed_linear` is an opaque op so that inductor calls the
kernel as is (its own lowering of the packed ops wants weights frozen into the graph, which an
engine that shares its model with a trainer cannot use).
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

from ...calibrate import best_time, remember
from ...quant.fp8 import WEIGHT, QTensor, dequantize

KINDS = ("fp32", "mkl", "onednn32", "panel", "bf16", "onednn", "fp8")
DTYPE = {"fp32": torch.float32, "mkl": torch.float32, "onednn32": torch.float32, "panel": torch.float32,
         "bf16": torch.bfloat16, "onednn": torch.bfloat16, "fp8": torch.bfloat16}   # the kernel's input dtype
STORAGE = {"fp8": torch.float8_e4m3fn}    # the weight's dtype in memory where it differs from DTYPE
ROUNDS = 3                                # timing rounds per candidate when choosing a kernel
PACKED = {"mkl": 0, "onednn": 1, "onednn32": 1, "panel": 2}   # the op's `kind` (oneDNN's op takes either dtype)
PANEL = 16                                # columns per panel of the panel kernel's pack


def storage(kind: str) -> torch.dtype:
    return STORAGE.get(kind, DTYPE[kind])


HAS_MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
HAS_AVX2 = platform.machine().lower() in ("x86_64", "amd64") and \
    torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def available(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> list[str]:
    """The kernels this device offers for these compute dtypes (plain ones first; "fp8" is the runner's
    choice for a model that holds e4m3 weights)."""
    kinds = [k for k in ("fp32", "bf16") if DTYPE[k] in dtypes]
    if device.type == "cpu":
        if HAS_MKL and torch.float32 in dtypes:
            kinds.append("mkl")
        if HAS_ONEDNN and torch.float32 in dtypes:
            kinds.append("onednn32")
        if HAS_ONEDNN and torch.bfloat16 in dtypes and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            kinds.append("onednn")
        if HAS_AVX2 and torch.float32 in dtypes and load_native():
            kinds.append("panel")
    return kinds


def pack(w: torch.Tensor, kind: str, rows: int) -> torch.Tensor | None:
    """w (N, K) in the kernel's dtype -> its packed form (a tensor in MKL's / oneDNN's own layout)."""
    if kind == "mkl":
        return torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), rows)
    if kind in ("onednn", "onednn32"):
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
    if kind == "panel":             # (ceil(N/16), K, 16): panel p = w[16p : 16p + 16].T, zero-padded columns;
        *lead, N, K = w.shape       # a stack of expert weights (E, N, K): each in panels (the grouped kernel)
        padded = w.new_zeros(*lead, -(-N // PANEL) * PANEL, K)
        padded[..., :N, :] = w
        return padded.view(*lead, -1, PANEL, K).transpose(-1, -2).contiguous()
    return None


def linear(x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor | None, kind: str) -> torch.Tensor:
    """x (..., K) @ w.T with the given kernel; x and w must already be in the kernel's dtype (fp8: w is
    the e4m3 weight and `packed` its block scales)."""
    if kind == "fp8":
        return F.linear(x, dequantize(QTensor(w, packed, WEIGHT), x.dtype))
    if packed is None:
        return F.linear(x, w)
    return torch.ops.nanoseek.packed_linear(x, packed, w, PACKED[kind])


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, w: torch.Tensor, kind: int) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    if kind == 0:
        y = torch.ops.mkl._mkl_linear(x2, packed, w, None, x2.shape[0])
    elif kind == 2:     # the panel layout by torch ops (only where the C++ kernel is not loaded: slow)
        y = torch.matmul(x2, packed).transpose(0, 1).reshape(x2.shape[0], -1)[:, : w.shape[0]]
    else:
        y = torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
    return y.view(*x.shape[:-1], w.shape[0])


# A function definition registered with the dispatcher (like `def`, not state). torch.library.Library
# rather than @custom_op: ~3 us per call instead of ~11, and a decode step makes ~20 of them.
_lib = torch.library.Library("nanoseek", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor packed, Tensor w, int kind) -> Tensor")
_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")   # also for the packs' MkldnnCPU key


@torch.library.register_fake("nanoseek::packed_linear")
def _(x, packed, w, kind):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def grouped_linear(x: torch.Tensor, packs: torch.Tensor, offsets: torch.Tensor, n: int) -> torch.Tensor:
    """Rows sorted by expert, x (P, K), `offsets` (E + 1) their cumulative counts -> (P, n): row r times
    its expert's weight (`pack(stack, "panel", ...)`), routed rows only (the C++ panel kernel; here the same maths by
    torch ops, one expert at a time: the reference the kernel is tested against)."""
    return torch.ops.nanoseek.grouped_linear(x, packs, offsets, n)


def _grouped_linear(x, packs, offsets, n):
    E, _, K, _ = packs.shape
    w_t = packs.transpose(1, 2).reshape(E, K, -1)[..., :n]            # (E, K, n): each expert's w.T
    y = x.new_empty(x.shape[0], n)
    bounds = offsets.tolist()
    for e in range(E):
        y[bounds[e]: bounds[e + 1]] = x[bounds[e]: bounds[e + 1]] @ w_t[e]
    return y


_lib.define("grouped_linear(Tensor x, Tensor packs, Tensor offsets, int n) -> Tensor")
_lib.impl("grouped_linear", _grouped_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("nanoseek::grouped_linear")
def _(x, packs, offsets, n):
    return x.new_empty(x.shape[0], n)


@functools.cache        # one build attempt per process (a failed one warns once)
def load_native() -> bool:
    """Build (once per machine, ~40 s, cached by torch) and load packed_linear.cpp, the same kernel in
    C++ (and the panel kernel, which exists only there): from a compiled step's C++ wrapper it then never
    enters Python. False, with a warning, where it cannot be built (no compiler or ninja): the Python
    kernel above does the same work, slower, and the runner does without the panel kind."""
    import warnings
    from pathlib import Path

    if torch._C._dispatch_has_kernel_for_dispatch_key("nanoseek::packed_linear", "CPU"):
        return True                    # loaded already (the dispatcher is the only record of it)
    try:
        from torch.utils.cpp_extension import load
        load("nanoseek_runner_gemm", [str(Path(__file__).with_name("packed_linear.cpp"))],
             extra_cflags=["-O3"], is_python_module=False)   # -O3: the tiles unrolled, in registers
    except Exception as e:
        warnings.warn(f"nanoseek: C++ packed linear not built ({type(e).__name__}: {str(e)[:200]}); "
                      "using the Python kernel")
        return False
    return True


def fastest(device: torch.device, rows: int, K: int, N: int, kinds: list[str], measured: list | None = None) -> str:
    """The fastest of `kinds` for a (rows x K) @ (K x N) product on this host: timed once on random
    weights (the best of up to 10 calls each), then read from the calibration cache. Shapes timed now
    are appended to `measured`."""
    if len(kinds) == 1:
        return kinds[0]

    def measure():
        g = torch.Generator().manual_seed(0)
        w32, x32 = torch.randn(N, K, generator=g), torch.randn(rows, K, generator=g)
        calls = {}
        for kind in kinds:
            w, x = w32.to(DTYPE[kind]), x32.to(DTYPE[kind])
            calls[kind] = functools.partial(linear, x, w, pack(w, kind, rows), kind)
        # the candidates take turns (ROUNDS rounds, the best of each): timed one after the other, a burst
        # of load on a shared host once made a bf16 kernel win a shape where it is 2x slower (AVX2 EPYC)
        times = dict.fromkeys(kinds, float("inf"))
        for _ in range(ROUNDS):
            for kind, call in calls.items():
                times[kind] = min(times[kind], best_time(call, budget_s=0.004, reps=4))
        return min(times, key=times.get)

    kind, new = remember(device, f"gemm|{','.join(sorted(kinds))}|{rows}x{K}x{N}", measure)
    if new and measured is not None:
        measured.append((rows, K, N))
    return kind
