"""Multi-head Latent Attention (DeepSeek-V2 sec. 2.1, V3 eqs. 1-11).

Shape legend: B batch, T new tokens, S attended tokens (cache + new), D hidden, H heads,
N = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim, C = kv_lora_rank, Q = q_lora_rank.

    c_Q  = RMSNorm(W_DQ h)                    (B,T,Q)      skipped when q_lora_rank == 0
    q    = W_UQ c_Q -> per head [q_nope (N) ; q_pe (R)], q_pe rotated
    [c~ ; k~_pe] = W_DKV h                    (B,T,C+R)    one rope key shared by all heads
    c_KV = RMSNorm(c~)                        (B,T,C)      what the inference cache stores,
    k_pe = RoPE(k~_pe)                        (B,T,R)      with k_pe: C+R numbers per token per layer
    [k_nope ; v] per head = W_UKV c_KV        W_UKV = wkv_b, rows [h*(N+V), (h+1)*(N+V)) = [W_UK_h ; W_UV_h]
    o_h  = softmax(tau * q_h . k_h) v_h ;  out = W_O [o_1 .. o_H]

Two equal ways to attend (tested against each other):
  naive   - expand k_nope and v for every token and head, then ordinary multi-head attention.
            Best for training / long prefill without a cache.
  absorbed- q_nope . (W_UK c) = (W_UK^T q_nope) . c, so map queries into latent space once
            (q_lat = W_UK^T q_nope, C wide) and attend over the cached c_KV and k_pe directly: MQA with
            one (C+R)-wide key and one C-wide value shared by all heads. The output is mapped back
            with W_UV afterwards. Nothing per-head is ever materialised for cached tokens.
tau includes YaRN's mscale^2 on the whole logit (nope and rope parts alike).

Folding W_UK into the query projection and W_UV into W_O ahead of time (V2 paper App. C) is an
inference-only transformation of the weights: the decode runner (`nanoseek/inference/runner/`)
derives those weights from this module, owns them, and is tested against the paths here.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm
from .rope import apply_rope


class LatentCache(Protocol):
    """What attention needs from an inference cache (the engine implements it).

    `update(layer, kv_BTC, pe_BTR)` stores the new tokens' normalised latent and rotated rope key for
    `layer` and returns everything to attend to as one tensor kvpe (B,S,C+R) = [c_KV ; k_pe] (the
    absorbed path uses it directly as the shared key, and its first C channels as the value), plus an
    additive float mask (B,1,T,S): 0 where query t may attend key s, -inf elsewhere.
    """

    def update(self, layer: int, kv: torch.Tensor, pe: torch.Tensor): ...


class AttentionMask(Protocol):
    """A mask that attends by itself, passed as `mask` in place of a tensor (no cache; e.g. the trainer's
    FlexAttention document mask on a GPU, `nanoseek.train.flex_mask`): `attend(q, k, v, scale)` with
    q, k (B,H,T,N+R) and v (B,H,T,V) returns (B,H,T,V), equal to the naive path with its dense mask."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor: ...


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.nope, self.rope_dim, self.v_dim = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                              cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        H, D, qk = cfg.num_attention_heads, cfg.hidden_size, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        else:
            self.wq = nn.Linear(D, H * qk, bias=False)
        self.wkv_a = nn.Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(H * cfg.v_head_dim, D, bias=False)

    def project(self, x: torch.Tensor, rot: torch.Tensor):
        """x (B,T,D) -> q_nope (B,T,H,N), q_pe (B,T,H,R) rotated, kv (B,T,C) normalised, pe (B,T,R) rotated."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if hasattr(self, "wq_a") else self.wq(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope, self.rope_dim], dim=-1)
        kv, pe = self.wkv_a(x).split([self.kv_rank, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, rot), self.kv_norm(kv), apply_rope(pe, rot)

    def forward(self, x, rot, cache: LatentCache | None = None, absorb: bool | None = None,
                mask: torch.Tensor | None = None):
        """Without a cache: causal attention over x, or `mask` (B,1,T,T) e.g. document masking of
        packed sequences (or an `AttentionMask` object, naive path only). With a cache: attend over
        cache + x. `absorb` picks the path (default: absorbed for short steps against a cache - decode,
        speculative verification)."""
        T = x.shape[1]
        if absorb is None:
            absorb = cache is not None and T <= 4
        q_nope, q_pe, kv, pe = self.project(x, rot)
        if cache is not None:
            kvpe, mask = cache.update(self.layer_id, kv, pe)
            kv, pe = kvpe[..., : self.kv_rank], kvpe[..., self.kv_rank:]
        else:
            kvpe = torch.cat([kv, pe.to(kv.dtype)], dim=-1) if absorb else None
        if absorb:
            o = self.attend_absorbed(q_nope, q_pe, kvpe, mask)
        else:
            o = self.attend_naive(q_nope, q_pe, kv, pe, mask)
        return self.wo(o)

    # ---------------------------------------------------------------------------------------------
    def _wkv_b_heads(self, dtype):
        """wkv_b as (H, N+V, C): per head, W_UK rows then W_UV rows."""
        return self.wkv_b.weight.to(dtype).view(self.n_heads, self.nope + self.v_dim, self.kv_rank)

    def attend_naive(self, q_nope, q_pe, kv, pe, mask):
        B, T, H, _ = q_nope.shape
        S = kv.shape[1]
        k_nope, v = self.wkv_b(kv).view(B, S, H, self.nope + self.v_dim).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe.to(q_nope.dtype)], dim=-1).transpose(1, 2)                 # B,H,T,N+R
        k = torch.cat([k_nope, pe.to(k_nope.dtype).unsqueeze(2).expand(B, S, H, self.rope_dim)], dim=-1)
        k, v = k.transpose(1, 2), v.transpose(1, 2)                                               # B,H,S,*
        if hasattr(mask, "attend"):     # an AttentionMask brings its own kernel
            o = mask.attend(q, k, v, self.scale)
        elif q.device.type != "cpu":    # a GPU: SDPA's fused kernels (cuDNN / memory-efficient take v's width)
            o = fused_attention(q, k, v, mask, self.scale)
        else:
            o = manual_attention(q, k, v, mask, self.scale)
        return o.transpose(1, 2).reshape(B, T, H * self.v_dim)

    def attend_absorbed(self, q_nope, q_pe, kvpe, mask):
        """mask: None (causal over a fresh sequence), bool (B,1,T,S) or additive float (B,1,T,S)."""
        B, T, H, _ = q_nope.shape
        w = self._wkv_b_heads(q_nope.dtype)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]                                           # H,N,C / H,V,C
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, w_uk)                                       # B,T,H,C
        o_lat = self._latent_attention(torch.cat([q_lat, q_pe.to(q_lat.dtype)], dim=-1), kvpe, mask)
        o = torch.einsum("bthc,hvc->bthv", o_lat.view(B, T, H, self.kv_rank), w_uv)
        return o.reshape(B, T, H * self.v_dim)

    def _latent_attention(self, q, kvpe, mask):
        """q (B,T,H,C+R) against the shared key kvpe (B,S,C+R) and value kvpe[..., :C] -> (B,T*H,C).
        All T*H query vectors attend to one key/value head, so heads fold into the query axis and the
        attention is two batched matmuls (on CPU ~10x faster than SDPA with a mask)."""
        B, T, H, _ = q.shape
        S = kvpe.shape[1]
        q = q.reshape(B, T * H, -1)
        k = kvpe.to(q.dtype)
        bias = additive_mask(mask, T, S, q.device)                                                 # (B|1),1,T,S
        bias = bias.to(q.dtype).view(bias.shape[0], T, 1, S)
        bias = bias.squeeze(1) if T == 1 else bias.expand(-1, T, H, S).reshape(-1, T * H, S)
        scores = torch.baddbmm(bias.expand(B, T * H, S) if bias.shape[0] == 1 else bias, q,
                               k.transpose(1, 2), alpha=self.scale)
        return torch.bmm(scores.float().softmax(dim=-1).to(k.dtype), k[..., : self.kv_rank])


def fused_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """q, k (B,H,T|S,N+R), v (B,H,S,V) -> (B,H,T,V) by SDPA: causal, or `mask` (B,1,T,S) bool or additive
    (document masking) passed on, which SDPA's memory-efficient and cuDNN kernels take."""
    T, S = q.shape[2], k.shape[2]
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=scale)
    if mask is None:                # causal aligned to the last key (SDPA's is_causal aligns to the first)
        mask = additive_mask(None, T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if mask.dtype == torch.bool else mask.to(q.dtype),
                                          scale=scale)


def manual_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """The same as `fused_attention` in two batched GEMMs, the softmax accumulating in fp32. On CPU SDPA has no fused
    kernel when v's head dim differs from q/k's (always, in MLA) and falls back to its math path,
    which this beats 1.6x forward + backward and ~3x forward alone (B64 x H8 x T80, fp32 and bf16,
    2 cores); with a mask SDPA's CPU path is slower still. The bias (causal or `mask`) is added by
    the first GEMM."""
    B, H, T, _ = q.shape
    S = k.shape[2]
    bias = additive_mask(mask, T, S, q.device).to(q.dtype)                                       # (B|1),1,T,S
    bias = bias.expand(B, H, T, S).reshape(B * H, T, S)
    scores = torch.baddbmm(bias, q.reshape(B * H, T, -1), k.reshape(B * H, S, -1).transpose(1, 2), alpha=scale)
    # softmax in the scores' dtype: CPU kernels accumulate bf16 in fp32, and the probabilities are the
    # fp32 ones rounded once, as a cast would round them; only the backward then sees bf16 probabilities.
    # (the whole attention 1.10-1.19x faster forward + backward in bf16, `bench_train_kernels.py --parts attention`)
    p = scores.softmax(dim=-1) if scores.dtype in (torch.float32, torch.bfloat16) else scores.float().softmax(dim=-1)
    return torch.bmm(p.to(v.dtype), v.reshape(B * H, S, -1)).view(B, H, T, -1)


def additive_mask(mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor:
    """None -> causal (query t sees keys <= t + S - T); bool -> 0/-inf; float masks pass through."""
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=device).masked_fill(~mask, float("-inf"))
    return mask
