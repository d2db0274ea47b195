"""Weight-only FP8 for inference: weights held in memory as e4m3 + 128x128 block scales, as DeepSeek's
FP8 checkpoints store them (half of bf16), dequantized per GEMM (`LLM(..., weights="fp8")`,
`serve --weights fp8`). The quantization itself is `nanoseek.quant.fp8`'s."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.moe import Experts, matmul_dtype
from .fp8 import WEIGHT, QTensor, dequantize, quantize, swap_block_modules

def _hold(module: nn.Module, name: str, w: torch.Tensor) -> None:
    """Keep `w` in `module` as e4m3 + 128x128 block scales (buffers NAME_q, NAME_scale)."""
    q = quantize(w.detach(), WEIGHT)
    module.register_buffer(name + "_q", q.q, persistent=False)
    module.register_buffer(name + "_scale", q.scale, persistent=False)


def _held(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(QTensor(getattr(module, name + "_q"), getattr(module, name + "_scale"), WEIGHT), dtype)


class FP8WeightLinear(nn.Module):
    """A bias-free linear whose weight lives in memory as e4m3 + block scales. `weight` dequantizes on
    read (code that reads a linear's weight keeps working); the forward dequantizes per GEMM into the
    input's dtype. state_dict() gives the dequantized weight under the usual name."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        _hold(self, "weight", weight)

    @property
    def weight(self) -> torch.Tensor:
        return _held(self, "weight", self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = matmul_dtype(x)
        return F.linear(x.to(dt), _held(self, "weight", dt))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp8"


class FP8WeightExperts(Experts):
    """Routed experts stored as e4m3 stacks with per-expert 128x128 block scales."""

    def __init__(self, experts: Experts):
        nn.Module.__init__(self)
        self.dtype = experts.w13.dtype
        for name in ("w13", "w2"):
            _hold(self, name, getattr(experts, name))

    @property
    def w13(self) -> torch.Tensor:
        return _held(self, "w13", self.dtype)

    @property
    def w2(self) -> torch.Tensor:
        return _held(self, "w2", self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "w13"], destination[prefix + "w2"] = self.w13, self.w2


def holds_fp8_weights(model: nn.Module) -> bool:
    """Has `quantize_weights` converted this model (the decode runner then reads e4m3 weights too)?"""
    return any(isinstance(m, (FP8WeightLinear, FP8WeightExperts)) for m in model.modules())


@torch.no_grad()
def quantize_weights(model: nn.Module) -> int:
    """Weight-only FP8 for inference, in place: the linears and routed experts of every block (main and
    MTP) are held as e4m3 + 128x128 block scales, as DeepSeek's FP8 checkpoints store them; embedding,
    head, router, norms and the MTP projection keep their dtype. Returns the modules converted."""
    def replace(child):
        if isinstance(child, nn.Linear) and child.bias is None:
            return FP8WeightLinear(child.weight)
        if isinstance(child, Experts) and not isinstance(child, FP8WeightExperts):
            return FP8WeightExperts(child)
        return None
    return swap_block_modules(model, replace)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
