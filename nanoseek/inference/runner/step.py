"""The decode step's forward: `Transformer.hidden` + `logits` for a few new tokens per row against the
latent cache, over the runner's derived weights (weights.py) and GEMM kernels (gemm.py).

    h = decode_hidden(model, W, plan, cache, model.embed(ids).float())   ids (B, T) -> (B, T, D) fp32
    logits = decode_head(model, W, plan, h)                              -> (B, T, V) fp32
    speculate(model, W, plan, cache, ids)                                the MTP verify + draft step

`W` maps names to tensors (the GEMM weights in their kernels' dtypes, their packs, the expert stacks);
`plan` maps each GEMM to its kernel. The residual stream stays fp32; each GEMM casts its input to its
kernel's dtype and its output back. Norms, embedding, router bias and RoPE are the model's own
(read live); folded attention and the MoE decode paths are the runner's; layers whose attention does
not fold (V3-sized kv_lora_rank) run the model's absorbed attention. Everything here is plain torch,
so the same function runs eagerly or under torch.compile (runner/__init__.py), and is tested against
the model's own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...model.layers import MLP
from ...model.moe import MoE
from ...model.rope import apply_rope
from . import gemm
from .moe import moe_decode


def decode_hidden(model, W: dict, plan: dict, cache, x: torch.Tensor, blocks=None,
                  flags: list | None = None) -> torch.Tensor:
    """Embedded inputs x (B, T, D) at positions `cache.positions` (the caller ran `cache.begin`) ->
    hidden states (B, T, D) fp32 before the final norm. `blocks`: (index, Block) pairs to run instead
    of the main layers (the MTP module's block). `flags`: see `moe_decode`; a plan's "moe{i}.capacity"
    fixes layer i's capacity (compiled steps), without one the step sizes it to the busiest expert."""
    rot = model.rope(cache.positions)
    lin = _linear(W, plan)
    for i, layer in blocks if blocks is not None else enumerate(model.layers):
        h = layer.attn_norm(x)
        if f"attn{i}.q" in plan:
            x = x + folded_attention(layer.attn, i, lin, cache, h, rot)
        else:
            # the model's own absorbed attention, in the model's dtype (bf16 weights: bf16 in)
            x = x + layer.attn(h.to(_dtype(layer.attn.wkv_a)), rot, cache, absorb=True).float()
        h = layer.ffn_norm(x)
        if isinstance(layer.ffn, MoE):
            x = x + moe_decode(layer.ffn, i, h.reshape(-1, h.shape[-1]), lin, W, plan[f"moe{i}.path"],
                               flags, plan.get(f"moe{i}.capacity")).view(h.shape)
        elif isinstance(layer.ffn, MLP):
            gate, up = lin(f"mlp{i}.w13", h).chunk(2, dim=-1)
            x = x + lin(f"mlp{i}.w2", F.silu(gate) * up)
    return x


def decode_head(model, W: dict, plan: dict, h: torch.Tensor, norm=None) -> torch.Tensor:
    return _linear(W, plan)("head", (norm or model.norm)(h))


def greedy(logits: torch.Tensor):
    """-> (argmax token, its log-prob) along the last dim. The token is the first index holding the max
    (argmax's tie rule), found with two plain reductions: a max-with-index reduction measured 1.2-1.35x
    slower compiled on CPU at 8-64 x 4096 logits."""
    best = logits.amax(dim=-1, keepdim=True)
    V = logits.shape[-1]
    token = torch.where(logits == best, torch.arange(V, device=logits.device), V).amin(dim=-1)
    lse = best.squeeze(-1) + (logits - best).exp().sum(dim=-1).log()
    return token, best.squeeze(-1) - lse


def speculate(model, W: dict, plan: dict, cache, ids: torch.Tensor, flags: list | None = None):
    """One MTP speculative step (speculative.py has the protocol): ids (B, 2) = [pending, draft] at
    positions L, L+1 (the caller ran `cache.begin`). The main model verifies both; the MTP module then
    reads the same two positions (main hidden state, embedding of the token the main model chose next)
    and drafts the token after the last accepted one.
    -> main greedy tokens (B, 2), their log-probs, accepted (B,) bool, next draft (B,)."""
    L = len(model.layers)
    h = decode_hidden(model, W, plan, cache, model.embed(ids).float(), flags=flags)
    logits = decode_head(model, W, plan, h)
    tokens, logp = greedy(logits)
    accepted = tokens[:, 0] == ids[:, 1]
    mtp = model.mtp[0]
    x = torch.cat([mtp.enorm(model.embed(tokens).float()), mtp.hnorm(h)], dim=-1)
    x = _linear(W, plan)("mtp0.eh", x)
    hm = decode_hidden(model, W, plan, cache, x, blocks=[(L, mtp.block)], flags=flags)
    last = torch.where(accepted.unsqueeze(-1), hm[:, 1], hm[:, 0])          # the last accepted position
    drafts = greedy(decode_head(model, W, plan, last, norm=mtp.norm))[0]
    return tokens, logp, accepted, drafts


def folded_attention(attn, i: int, lin, cache, x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """MLA with W_UK folded into the query projection and W_UV into W_O (weights.py): three GEMMs,
    attention over the cached [c_KV ; k_pe] as one shared key/value head."""
    B, T, _ = x.shape
    H, C, R = attn.n_heads, attn.kv_rank, attn.rope_dim
    a = lin(f"attn{i}.down", x)                                     # B,T,(Q +) C + R
    if hasattr(attn, "wq_a"):
        Q = a.shape[-1] - C - R
        c_q, a = attn.q_norm(a[..., :Q]), a[..., Q:]
    else:
        c_q = x
    q = lin(f"attn{i}.q", c_q).view(B, T, H, C + R)
    q = torch.cat([q[..., :C], apply_rope(q[..., C:], rot)], dim=-1)
    kvpe, mask = cache.update(attn.layer_id, attn.kv_norm(a[..., :C]), apply_rope(a[..., C:], rot))
    o_lat = attn._latent_attention(q, kvpe, mask)                  # B,T*H,C
    return lin(f"attn{i}.out", o_lat.reshape(B, T, H * C))


def _dtype(linear) -> torch.dtype:
    """A linear's compute dtype, without touching `.weight` (an fp8-weight linear dequantizes it)."""
    return getattr(linear, "dtype", None) or linear.weight.dtype


def _linear(W: dict, plan: dict):
    def lin(name: str, x: torch.Tensor) -> torch.Tensor:
        kind = plan[name]
        return gemm.linear(x.to(gemm.DTYPE[kind]), W[name], W.get(name + ".pack"), kind).float()
    return lin
