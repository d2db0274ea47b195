"""The DeepSeek-V3 transformer: embedding -> blocks (dense SwiGLU first, MoE after) -> RMSNorm -> head,
plus the MTP modules. Pre-norm, no biases, no dropout, untied head.

The model is single-device and pure: forward takes token ids, optional positions and an optional
cache object owned by the caller (the inference engine); it keeps no per-request state. Parallelism,
quantisation and compilation are applied from outside.

    logits = model(ids)                          (B,T,V)
    h = model.hidden(ids, positions, cache)      (B,T,D) before the final norm
    logits = model.logits(h)
    mtp_h = model.mtp_hidden(h, ids, positions)  one (B,T,D) per MTP depth; model.mtp_logits(...)
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP, RMSNorm
from .mla import MLA
from .moe import MoE
from .mtp import MTPLayer, shift_left
from .rope import cos_sin_scale, inv_freq, rope_freqs


def moe_layer_id(module_name: str, n_layers: int) -> int:
    """The layer id of a block's MoE from its module name: "layers.3.ffn" -> 3, "mtp.0.block.ffn" -> n_layers
    (MTP block k is layer n_layers + k, as in the released checkpoints)."""
    head, idx = module_name.split(".")[:2]
    return int(idx) + (n_layers if head == "mtp" else 0)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = MLA(cfg, layer_id)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe_layer(layer_id) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rot, cache=None, mask=None, routing=None):
        x = x + self.attn(self.attn_norm(x), rot, cache, mask=mask)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, routing) if isinstance(self.ffn, MoE) else self.ffn(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.num_hidden_layers
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(L))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPLayer(cfg, L + k, Block(cfg, L + k))
                                 for k in range(cfg.num_nextn_predict_layers))
        self.register_buffer("inv_freq", inv_freq(cfg), persistent=False)
        self.rope_scale = cos_sin_scale(cfg)
        if cfg.tie_word_embeddings:
            self.head.weight = self.embed.weight

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> "Transformer":
        """N(0, initializer_range) for every matrix, ones for norms, zero router bias."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for p in self.parameters():
            if p.dim() == 1:   # the only vectors are RMSNorm weights
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * self.cfg.initializer_range)
        for moe in self.moe_layers():
            if moe.gate.bias is not None:
                moe.gate.bias.zero_()
        self.inv_freq.copy_(inv_freq(self.cfg))
        return self

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """Rotations [cos, sin] (..., T, R/2, 2) for these positions, shared by every layer of one forward."""
        return rope_freqs(positions, self.inv_freq, self.rope_scale)

    def hidden(self, ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
               mask: torch.Tensor | None = None, routing=None) -> torch.Tensor:
        """ids (B,T) -> last hidden state before the final norm (B,T,D). `mask` (B,1,T,T) replaces the
        causal mask (document masking of packed training windows); `positions` (B,T) or (1,T).
        `routing`: a `moe.RoutingRecord` every MoE layer adds its scores and expert ids to."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        rot = self.rope(positions)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, rot, cache, mask, routing)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(h))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        return self.logits(self.hidden(ids, positions, cache))

    def mtp_hidden(self, h: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor | None = None,
                   cache=None, mask: torch.Tensor | None = None, routing=None) -> list[torch.Tensor]:
        """Depth k=1..D hidden states; position i of depth k predicts token i+k+1."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        rot = self.rope(positions)
        outs = []
        for k, mtp in enumerate(self.mtp, start=1):
            h = mtp(h, self.embed(shift_left(ids, k)), rot, cache, mask, routing)
            outs.append(h)
        return outs

    def mtp_logits(self, h_k: torch.Tensor, k: int) -> torch.Tensor:
        return self.head(self.mtp[k - 1].norm(h_k))

    # ------------------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks, main then MTP: what compilation, recomputation, FP8 and FSDP wrap."""
        return list(self.layers) + [m.block for m in self.mtp]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_params(self, include_mtp: bool = False) -> int:
        return sum(p.numel() for name, p in self.named_parameters() if include_mtp or not name.startswith("mtp."))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device     # (a pipeline stage's copy may hold no embedding)
