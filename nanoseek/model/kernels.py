"""Inference GEMMs for the compiled CPU decode step: fp32 linears on MKL-prepacked weights.

A decode step multiplies a few rows (the batch) by every weight matrix. For so few rows a plain
`F.linear` spends most of its time re-packing the weight into MKL's blocked layout on every call:
measured here, (8 x 256) @ (256 x 4096) takes 183 us with F.linear and 85 us with the weight packed
once (~45 GB/s, the cache bandwidth), and (64 x 256) @ (256 x 4096) 701 vs 586 us. Inductor's
`freezing` mode does the same packing, but freezes the weights into the graph; here the packing sits
behind an opaque op that checks the weight on every call (version counter, address, shape, dtype) and
repacks after a change, so a compiled engine that shares its model with a trainer follows optimizer
steps, `load_state_dict` and the engine's refreshed folded weights. Not seen: writes through
`p.data` (`p.data.copy_(...)` bypasses the version counter); update with `torch.no_grad(): p.copy_(...)`.

    linear(x, w)   == F.linear(x, w) up to rounding; inside a torch.compile'd, no-grad, fp32 CPU graph
                      with MKL available it runs `nanoseek::packed_linear`.

The packed layout depends on the row count M (MKL's `_mkl_linear` falls back to an unpacked GEMM
when M differs), so packs are kept per (weight, M), at most `KEEP_PER_WEIGHT` row counts per weight
(the compiled step's batch buckets change rarely), and dropped when the weight is freed.
"""
from __future__ import annotations

import warnings
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F

MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")
# True only while the inference engine runs its compiled decode step. The model's decode-only paths
# (folded MLA weights, fused MoE weights) read derived weights that the engine refreshes right before
# that call; any other compiled forward (a user's torch.compile(model)) must not use them. Dynamo
# guards on this value, so the engine's graph and other graphs never mix.
ENGINE_STEP = False
KEEP_PER_WEIGHT = 2
_packs: dict[tuple[int, int], tuple] = {}   # (data_ptr, M) -> (weakref to the weight, its version, packed)
_rows: dict[int, list[int]] = {}            # data_ptr -> the row counts packed for it, oldest first
stats = {"packs": 0}


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T (no bias); prepacked under a compiled fp32 CPU inference graph."""
    if (MKL and torch.compiler.is_compiling() and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return torch.ops.nanoseek.packed_linear(x, w)
    return F.linear(x, w)


def _packed(w: torch.Tensor, M: int) -> torch.Tensor:
    ptr = w.data_ptr()
    hit = _packs.get((ptr, M))
    if hit is not None and hit[0]() is w and hit[1] == (w._version, w.shape, w.dtype):
        return hit[2]
    packed = torch.ops.mkl._mkl_reorder_linear_weight(w.contiguous(), M)
    stats["packs"] += 1
    # the entries go when the weight is freed, so a new tensor at the same address never hits them
    ref = weakref.ref(w, lambda _, p=ptr: [_packs.pop((p, m), None) for m in _rows.pop(p, [])])
    _packs[(ptr, M)] = (ref, (w._version, w.shape, w.dtype), packed)
    rows = [m for m in _rows.get(ptr, []) if m != M] + [M]
    _rows[ptr] = rows
    while len(rows) > KEEP_PER_WEIGHT:
        _packs.pop((ptr, rows.pop(0)), None)
    return packed


def packs_made() -> int:
    """How many weights were packed so far (Python and C++ kernels together)."""
    return stats["packs"] + (torch.ops.nanoseek.native_packs_made() if _native else 0)


# Defined with torch.library.Library rather than @custom_op: the call costs ~3 us instead of ~11 us,
# and a decode step makes ~20 of these calls. The Python kernel is the CompositeExplicitAutograd
# fallback; `load_native()` builds packed_linear.cpp (once, ~40 s, cached by torch) and registers the
# same kernel in C++ for the CPU key, which takes precedence: from the compiled step's C++ wrapper it
# then never enters Python (measured ~5 us saved per call).
_lib = torch.library.Library("nanoseek", "FRAGMENT")
_lib.define("packed_linear(Tensor x, Tensor w) -> Tensor")
_native: bool | None = None


def _packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.is_contiguous():
        return torch.ops.mkl._mkl_linear(x, _packed(w, x.shape[0]), w, None, x.shape[0])
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    M = x2.shape[0]
    return torch.ops.mkl._mkl_linear(x2, _packed(w, M), w, None, M).view(*x.shape[:-1], w.shape[0])


_lib.impl("packed_linear", _packed_linear, "CompositeExplicitAutograd")


@torch.library.register_fake("nanoseek::packed_linear")
def _(x, w):
    return x.new_empty(*x.shape[:-1], w.shape[0])


def load_native() -> bool:
    """Build/load the C++ kernel (first call only); False (with one warning) where it cannot be built."""
    global _native
    if _native is None:
        _native = False
        if MKL:
            try:
                from torch.utils.cpp_extension import load
                load("nanoseek_packed_linear", [str(Path(__file__).with_name("packed_linear.cpp"))],
                     extra_cflags=["-O2"], is_python_module=False)
                _native = True
            except Exception as e:      # no compiler / ninja: the Python kernel does the same, slower
                warnings.warn(f"nanoseek: C++ packed linear not built ({type(e).__name__}: {str(e)[:200]}); "
                              "using the Python kernel")
    return _native
