"""HF-format checkpoints in and out: config.json + (sharded) safetensors + index.

THE name-mapping table between HF/hub tensor names and nanoseek's lives here (`BLOCK_MAP`), used in
both directions. Our names follow the official DeepSeek inference code (wq_a, wkv_b, w13, ...).

Experts. The hub release stores one tensor per expert (`mlp.experts.{e}.gate_proj.weight`);
transformers >= 5 fuses them in memory (`mlp.experts.gate_up_proj` (E,2F,D), `down_proj` (E,D,F)).
We keep the fused layout in memory and read either on load; we write the hub layout, which
transformers, vLLM and SGLang all read.

MTP. Depth k lives at `model.layers.{L+k-1}.*` (a full decoder layer plus enorm, hnorm, eh_proj,
shared_head.norm and copies of the embedding and head). transformers ignores it on load; we read it
when present and build the model without MTP when the checkpoint has none (e.g. one saved by HF).

FP8. Tensors stored as float8_e4m3fn with a `<name>_scale_inv` partner (128x128 blocks) are
dequantised on load.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..common import UserError
from ..config import ModelConfig
from ..model import Transformer


class CheckpointError(UserError):
    """A checkpoint that does not match its config (missing tensor, wrong shape, ...)."""


# nanoseek name inside a block -> HF name inside `model.layers.N.`; a tuple means "concatenated on dim 0"
BLOCK_MAP: dict[str, str | tuple[str, ...]] = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w13.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared.w13.weight": ("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight"),
    "ffn.shared.w2.weight": "mlp.shared_experts.down_proj.weight",
    # stacked experts: "{e}" expands over experts; the fused HF name is the alternative source
    "ffn.experts.w13": ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"),
    "ffn.experts.w2": "mlp.experts.{e}.down_proj.weight",
}
FUSED_EXPERTS = {"ffn.experts.w13": "mlp.experts.gate_up_proj", "ffn.experts.w2": "mlp.experts.down_proj"}
TOP_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
MTP_MAP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
           "norm.weight": "shared_head.norm.weight"}
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")   # duplicates of embed / head in the release


def hf_sources(name: str, cfg: ModelConfig) -> tuple[str | tuple[str, ...], bool]:
    """nanoseek state-dict name -> (HF name or tuple of names, is_stacked_experts)."""
    if name in TOP_MAP:
        return TOP_MAP[name], False
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        prefix, rest = f"model.layers.{m[1]}.", m[2]
    else:
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if not m:
            raise KeyError(name)
        prefix = f"model.layers.{cfg.num_hidden_layers + int(m[1])}."
        rest = m[2]
        if rest in MTP_MAP:
            return prefix + MTP_MAP[rest], False
        rest = rest.removeprefix("block.")
    hf = BLOCK_MAP[rest]
    stacked = rest.startswith("ffn.experts.")
    if isinstance(hf, tuple):
        return tuple(prefix + h for h in hf), stacked
    return prefix + hf, stacked


# --------------------------------------------------------------------------------------------------
# export

def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith("gate.bias"):
            t = t.float()
        elif dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        src, stacked = hf_sources(name, cfg)
        if stacked:
            for e in range(t.shape[0]):
                if isinstance(src, tuple):
                    for part, n in zip(t[e].chunk(len(src), dim=0), src):
                        out[n.format(e=e)] = part.contiguous()
                else:
                    out[src.format(e=e)] = t[e].contiguous()
        elif isinstance(src, tuple):
            for part, n in zip(t.chunk(len(src), dim=0), src):
                out[n] = part.contiguous()
        else:
            out[src] = t.contiguous()
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        out[prefix + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[prefix + "shared_head.head.weight"] = out["lm_head.weight"].clone()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


def fp8_eligible(hf_name: str, shape: tuple[int, ...]) -> bool:
    """The tensors DeepSeek's FP8 release stores as e4m3: the linear weights of the decoder layers
    (attention projections, dense/shared/routed FFNs); not the router, norms, embedding, head or the
    MTP projection. Only whole 128x128 blocks: readers disagree on partial ones (DeepSeek's code and
    ours pad the last block; transformers 5.23 derives the block size as rows // scale rows, which
    silently misreads e.g. a 160-row weight as two 80-row blocks), so a weight with a dimension that
    is not a multiple of 128 is written in high precision instead."""
    return hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight") and \
        not hf_name.endswith("eh_proj.weight") and len(shape) == 2 and shape[0] % 128 == 0 and shape[1] % 128 == 0


FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}


def to_fp8_state_dict(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """HF tensors -> DeepSeek's FP8 format: eligible weights as e4m3 with a `<name>_scale_inv` (fp32,
    one per 128x128 block, dequant = block x scale), the rest in `dtype` (the release uses bf16)."""
    from ..quant.fp8 import WEIGHT, quantize

    out = {}
    for name, t in tensors.items():
        if fp8_eligible(name, tuple(t.shape)):
            q = quantize(t, WEIGHT)
            out[name], out[name + "_scale_inv"] = q.q, q.scale.contiguous()
        else:
            out[name] = t if not t.is_floating_point() or name.endswith("e_score_correction_bias") else t.to(dtype)
    return out


def save_pretrained(model, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 5 * 2**30, tokenizer=None, fp8: bool = False) -> Path:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`), and the tokenizer's
    files. `fp8`: in DeepSeek's FP8 release format (block-quantized e4m3 linears, other tensors in `dtype`
    or bf16). Any other causal LM (a transformers model being fine-tuned) is written in its own format."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if not isinstance(model, Transformer):
        if fp8:
            raise UserError("FP8 checkpoints are DeepSeek's format, for nanoseek (DeepSeek-V3-format) models only")
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save(path)
        return path
    tensors = to_hf_state_dict(model, dtype)
    if fp8:
        dtype = dtype or torch.bfloat16
        tensors = to_fp8_state_dict(tensors, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    for old in path.glob("model*.safetensors*"):
        old.unlink()
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_cfg = model.cfg.to_hf_dict()
    if dtype is not None:
        hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if fp8:
        hf_cfg["quantization_config"] = dict(FP8_QUANT_CONFIG)
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id, "do_sample": False}) + "\n")
    if tokenizer is not None:
        tokenizer.save(path)
    return path


# --------------------------------------------------------------------------------------------------
# import

class _SafetensorsDir:
    """Lazy (mmap) access to every tensor of a single-file or sharded checkpoint."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {path}")
        self.handles = {}
        self.where: dict[str, str] = {}
        for f in files:
            if not (path / f).exists():
                raise CheckpointError(f"{path / f} is listed in the index but missing")
            try:
                h = safe_open(str(path / f), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated files
                raise CheckpointError(f"cannot read {path / f}: {e}") from None
            self.handles[f] = h
            for k in h.keys():
                self.where[k] = f

    def __contains__(self, name):
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        t = self.handles[self.where[name]].get_tensor(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and name + "_scale_inv" in self.where:
            t = dequant_fp8_blocks(t, self.handles[self.where[name + "_scale_inv"]].get_tensor(name + "_scale_inv"))
        return t


def dequant_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    """FP8 (out,in) weight times its per-128x128-block scale -> fp32 (the release's weight format)."""
    out, inp = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:out].repeat_interleave(block, 1)[:, :inp]
    return w.float() * s


def _read(src: _SafetensorsDir, names: str | tuple[str, ...]) -> torch.Tensor:
    if isinstance(names, tuple):
        return torch.cat([src.get(n) for n in names], dim=0)
    return src.get(names)


def load_hf_state_dict(src: _SafetensorsDir, model: Transformer) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    expected = {k: v for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for name, ref in expected.items():
        hf, stacked = hf_sources(name, cfg)
        try:
            if stacked and _fused_name(name, cfg) in src:
                t = src.get(_fused_name(name, cfg))
            elif stacked:
                t = torch.stack([_read(src, tuple(n.format(e=e) for n in hf) if isinstance(hf, tuple)
                                       else hf.format(e=e)) for e in range(ref.shape[0])])
            else:
                t = _read(src, hf)
        except KeyError as e:
            missing.append(f"{e.args[0]} (for {name})")
            continue
        if tuple(t.shape) != tuple(ref.shape):
            hint = hf if isinstance(hf, str) else " + ".join(hf)
            raise CheckpointError(f"tensor {hint.format(e='*')} has shape {tuple(t.shape)} but the config needs "
                                  f"{tuple(ref.shape)} (nanoseek {name}); config.json and weights disagree")
        sd[name] = t
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:5])}{more}")
    return sd


def _fused_name(name: str, cfg: ModelConfig) -> str:
    hf, _ = hf_sources(name, cfg)
    first = hf[0] if isinstance(hf, tuple) else hf
    prefix = first.split("mlp.experts.")[0]
    return prefix + FUSED_EXPERTS["ffn." + name.split(".ffn.", 1)[1]]


def from_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None) -> Transformer:
    """Load an HF-format DeepSeek-V3/V2 directory (hub per-expert names or transformers' fused ones)."""
    from ..common import parse_dtype

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (expected config.json + *.safetensors)")
    cfg = ModelConfig.load(path)
    src = _SafetensorsDir(path)
    if cfg.num_nextn_predict_layers:
        mtp_prefix = f"model.layers.{cfg.num_hidden_layers}."
        if not any(k.startswith(mtp_prefix) for k in src.where):
            cfg = cfg.replace(num_nextn_predict_layers=0)   # e.g. saved by transformers, which drops MTP
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = load_hf_state_dict(src, model)
    model.load_state_dict(sd, assign=True, strict=True)
    return finalize_loaded(model, parse_dtype(dtype), device)


def finalize_loaded(model: Transformer, dtype: torch.dtype | None, device) -> Transformer:
    """Materialise non-persistent buffers (built on meta) and move to dtype/device."""
    from ..model.rope import inv_freq

    model.inv_freq = inv_freq(model.cfg)
    for moe in model.moe_layers():
        moe.expert_load = torch.zeros(model.cfg.n_routed_experts)
        if moe.gate.bias is not None:
            moe.gate.bias = moe.gate.bias.float()
    for p in model.parameters():
        if dtype is None and p.dtype != torch.float32 and p.is_floating_point():
            p.data = p.data.float()
    if dtype is not None:
        model.to(dtype)
    if device is not None:
        model.to(device)
    model.inv_freq = model.inv_freq.float()
    return model.eval()
