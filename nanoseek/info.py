"""`nanoseek info PRESET_OR_DIR`: parameter counts and cache size, computed on the meta device.

Counting conventions (they reproduce DeepSeek's published figures, see the architecture spec sec. 6):
- total_params: the main model without MTP, including the fp32 router bias (e_score_correction_bias);
  671,026,419,200 for V3.
- activated_params: per token; each MoE layer counts only K routed + the shared experts. Embedding and
  head included (37.55B for V3); `activated_params_no_embedding` drops the input embedding (36.63B).
- mtp_params: the MTP modules' own parameters, excluding the shared embedding and head (11.61B).
- kv_cache_bytes_per_token: the absorbed-MLA latent cache, (kv_lora_rank + rope dim) x layers x 2 (bf16).
"""
from __future__ import annotations

import argparse
import json

import torch

from .config import load_preset
from .model import Transformer
from .model.moe import Gate


def _count(module: torch.nn.Module) -> int:
    n = sum(p.numel() for p in module.parameters())
    n += sum(m.bias.numel() for m in module.modules() if isinstance(m, Gate) and m.bias is not None)
    return n


def model_info(cfg) -> dict:
    with torch.device("meta"):
        model = Transformer(cfg)
    comp = {"embedding": model.embed.weight.numel(), "head": model.head.weight.numel(), "attention": 0,
            "dense_ffn": 0, "routed_experts": 0, "shared_experts": 0, "routers": 0, "norms": 0}
    inactive = 0
    for block in model.layers:
        comp["attention"] += _count(block.attn)
        comp["norms"] += _count(block.attn_norm) + _count(block.ffn_norm)
        ffn = block.ffn
        if hasattr(ffn, "experts"):
            per_expert = ffn.experts.w13[0].numel() + ffn.experts.w2[0].numel()
            comp["routed_experts"] += _count(ffn.experts)
            comp["shared_experts"] += _count(ffn.shared) if ffn.shared is not None else 0
            comp["routers"] += _count(ffn.gate)
            inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
        else:
            comp["dense_ffn"] += _count(ffn)
    comp["norms"] += _count(model.norm)
    if cfg.tie_word_embeddings:
        comp["head"] = 0
    total = sum(comp.values())
    mtp = sum(_count(m) for m in model.mtp)
    L = cfg.num_hidden_layers
    return {
        "name": cfg.name,
        "total_params": total,
        "activated_params": total - inactive,
        "activated_params_no_embedding": total - inactive - comp["embedding"],
        "mtp_params": mtp,
        "kv_cache_bytes_per_token": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * L * 2,
        "naive_kv_cache_bytes_per_token": cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * L * 2,
        "breakdown": comp,
    }


def _human(n: int) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek info", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="preset name (tiny, mini, small, v2-lite, v3, r1) or an HF model directory")
    ap.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = ap.parse_args(argv)
    info = model_info(load_preset(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['name']}:")
    print(f"  total params (no MTP)      {info['total_params']:>20,}  ({_human(info['total_params'])})")
    print(f"  activated per token        {info['activated_params']:>20,}  ({_human(info['activated_params'])})")
    print(f"  MTP params                 {info['mtp_params']:>20,}  ({_human(info['mtp_params'])})")
    print(f"  latent KV cache / token    {info['kv_cache_bytes_per_token']:>20,} B (bf16)")
    print(f"  per-head K/V cache / token {info['naive_kv_cache_bytes_per_token']:>20,} B (bf16, if every head's "
          "K and V were cached as in plain MHA; transformers 5.x caches the latent too)")
    for k, v in info["breakdown"].items():
        print(f"    {k:<24} {v:>20,}  ({_human(v)})")
