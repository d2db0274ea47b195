"""Rotary position embedding with YaRN, in DeepSeek's interleaved-pair layout.

Only the qk_rope_head_dim "decoupled" slice of q and k is rotated (MLA keeps the rest position-free).

Layout. The official checkpoints rotate *adjacent pairs* (x0,x1), (x2,x3), ... by angle pos*w_j
(the complex-number view of `inference/model.py`). HF transformers reaches the same dot products
by de-interleaving first; both agree on q.k, but a cache written under one layout cannot be read
under the other. We rotate pairs in place and keep the interleaved layout everywhere.

YaRN (arXiv 2309.00071, DeepSeek-V3 report sec. 4.3). With d = rope dim, s = factor, L0 = original
context length and beta_fast/beta_slow rotation counts:
    w0_j  = theta^(-2j/d)                              j = 0 .. d/2-1
    D(r)  = d * ln(L0 / (2 pi r)) / (2 ln theta)       pair index that makes r turns within L0
    low   = max(floor(D(beta_fast)), 0);  high = min(ceil(D(beta_slow)), d-1)
    ramp_j = clamp((j - low) / (high - low), 0, 1)
    w_j   = w0_j * ((1 - ramp_j) + ramp_j / s)          fast pairs untouched, slow pairs / s
and the attention logits are scaled by m(s, mscale_all_dim)^2 with m(s, u) = 0.1 u ln s + 1 (see
`ModelConfig.softmax_scale`). Like HF, cos/sin are multiplied by m(s, mscale) / m(s, mscale_all_dim)
(1.0 for every released config). Policy: YaRN is on whenever rope_factor > 1, as in HF (the official
code additionally requires max_seq_len > original_seq_len).
"""
from __future__ import annotations

import math

import torch

from ..config import ModelConfig


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(dim: int, theta: float, orig_len: int, beta_fast: float, beta_slow: float):
    def corr(r):
        return dim * math.log(orig_len / (r * 2 * math.pi)) / (2 * math.log(theta))
    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), dim - 1)
    return low, high


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair angular frequencies w_j, shape (R/2,), fp32."""
    d = cfg.qk_rope_head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    if not cfg.yarn:
        return base
    low, high = yarn_correction_range(d, cfg.rope_theta, cfg.original_max_position_embeddings,
                                      cfg.beta_fast, cfg.beta_slow)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return base * (1 - ramp) + base / cfg.rope_factor * ramp


def cos_sin_scale(cfg: ModelConfig) -> float:
    if not cfg.yarn:
        return 1.0
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_get_mscale(cfg.rope_factor, cfg.mscale) / yarn_get_mscale(cfg.rope_factor, cfg.mscale_all_dim)
    return yarn_get_mscale(cfg.rope_factor)


def rope_freqs(positions: torch.Tensor, freqs: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """positions (..., T) int -> rotations scale * [cos(pos w_j), sin(pos w_j)], shape (..., T, R/2, 2) fp32."""
    ang = positions.to(torch.float32).unsqueeze(-1) * freqs
    return torch.stack([ang.cos(), ang.sin()], dim=-1) * scale


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (a, b) of the last dim by the angle in rot: (a cos - b sin, a sin + b cos),
    the complex product (a + ib)(cos + i sin) of the official code, written in real arithmetic (which
    torch.compile fuses; it generates no code for complex tensors). x (B, T, [H,] R); rot (B or 1, T, R/2, 2)."""
    if x.dim() == 4:  # per-head tensor: broadcast over heads
        rot = rot.unsqueeze(-3)
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rot.unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)
