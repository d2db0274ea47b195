"""ModelConfig: every DeepSeek-V3 (and V2/V2-Lite) architecture field in one flat typed dataclass.

Field names follow HF `config.json` (so a config round-trips without a table), except where HF
nests (`rope_scaling` / `rope_parameters`), which we flatten into `rope_*` fields. Presets are JSON
files in `configs/` (tiny, mini, small, v2-lite, v3, r1). `from_hf_dict` also accepts the official
DeepSeek `ModelArgs` names (`dim`, `n_heads`, `route_scale`, ...).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESET_ALIASES = {"r1": "v3", "deepseek-v3": "v3", "deepseek-r1": "v3", "v2lite": "v2-lite"}

TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


class ConfigError(ValueError):
    """An invalid model configuration; the message names the field and what is allowed."""


@dataclass(kw_only=True)
class ModelConfig:
    # sizes (defaults: DeepSeek-V3 671B)
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432          # dense SwiGLU width (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048       # width of one routed or shared expert
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    # MLA
    q_lora_rank: int = 1536                 # 0: plain q_proj (V2-Lite); HF writes null
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"           # noaux_tc: bias for selection + top-2-sum group score
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # RoPE + YaRN (rope_factor 1.0 = plain RoPE)
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    max_position_embeddings: int = 163840
    # Multi-Token Prediction depth D (0 = none)
    num_nextn_predict_layers: int = 1
    # misc
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.006        # the paper's std; HF's default is 0.02
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    name: str = field(default="custom", compare=False)

    def __post_init__(self):
        def need(cond, fld, msg):
            if not cond:
                raise ConfigError(f"ModelConfig.{fld}={getattr(self, fld)!r}: {msg}")

        for f in fields(self):
            if f.type in ("int", int) and f.name != "pad_token_id":
                v = getattr(self, f.name)
                need(isinstance(v, int) and not isinstance(v, bool), f.name, "must be an integer")
        positive = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
                    "original_max_position_embeddings"]
        for f in positive:
            need(getattr(self, f) > 0, f, "must be > 0")
        need(self.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0 means no query compression)")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(self.rope_factor >= 1.0, "rope_factor", "must be >= 1.0 (1.0 disables YaRN)")
        need(self.beta_fast > self.beta_slow, "beta_fast", f"must be > beta_slow={self.beta_slow}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be > 0")
        if self.has_moe:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be > 0")
            need(self.n_routed_experts > 0, "n_routed_experts", "must be > 0 when there are MoE layers")
            need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
            need(self.n_group >= 1, "n_group", "must be >= 1")
            need(self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts={self.n_routed_experts}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_method == "greedy" or per_group >= 2 or self.topk_method != "noaux_tc", "n_group",
                 "noaux_tc routing scores a group by its top-2 experts, so each group needs >= 2 experts")
            reachable = self.n_routed_experts if self.topk_method == "greedy" else per_group * self.topk_group
            need(1 <= self.num_experts_per_tok <= reachable, "num_experts_per_tok",
                 f"must be in [1, {reachable}] (experts in the topk_group={self.topk_group} kept groups)")
            need(self.topk_method != "noaux_tc" or self.scoring_func == "sigmoid", "topk_method",
                 "noaux_tc (bias-based balancing) needs scoring_func='sigmoid'")
        need(self.bos_token_id is None or 0 <= self.bos_token_id < self.vocab_size, "bos_token_id",
             f"must be in [0, vocab_size={self.vocab_size})")
        need(self.eos_token_id is None or 0 <= self.eos_token_id < self.vocab_size, "eos_token_id",
             f"must be in [0, vocab_size={self.vocab_size})")

    # derived ----------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.first_k_dense_replace < self.num_hidden_layers or self.num_nextn_predict_layers > 0

    def is_moe_layer(self, layer: int) -> bool:
        """MTP layers (index >= num_hidden_layers) are MoE layers too, as in the release."""
        return layer >= self.first_k_dense_replace

    @property
    def yarn(self) -> bool:
        return self.rope_factor > 1.0

    @property
    def softmax_scale(self) -> float:
        """tau = qk_head_dim^-1/2 * m^2, m = 0.1 * mscale_all_dim * ln(factor) + 1 (YaRN)."""
        scale = self.qk_head_dim ** -0.5
        if self.yarn and self.mscale_all_dim:
            m = 0.1 * self.mscale_all_dim * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # HF config.json ---------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        """A `config.json` that transformers (DeepseekV3/V2ForCausalLM), vLLM and nanoseek read."""
        d = {k: v for k, v in self.to_dict().items() if k not in _FLAT_ROPE and k != "name"}
        v2 = self.scoring_func == "softmax"
        d["model_type"] = "deepseek_v2" if v2 else "deepseek_v3"
        d["architectures"] = ["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"]
        d["q_lora_rank"] = self.q_lora_rank or None
        d["num_key_value_heads"] = self.num_attention_heads   # HF defaults this to 128: must be explicit
        d["hidden_act"] = "silu"
        d["attention_bias"] = False
        d["moe_layer_freq"] = 1
        d["rope_interleave"] = True
        d["torch_dtype"] = "float32"
        if self.yarn:
            rope = {"type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
                    "original_max_position_embeddings": self.original_max_position_embeddings,
                    "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
                    "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim}
            d["rope_scaling"] = dict(rope)
            d["rope_parameters"] = {**rope, "rope_theta": self.rope_theta}
        else:
            d["rope_scaling"] = None
            d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        d = dict(d)
        official = "dim" in d and "hidden_size" not in d
        if official:
            d = _from_official(d)
        out: dict = {}
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
        if "rope_theta" in rope:
            out["rope_theta"] = float(rope["rope_theta"])
        if rope_type == "yarn":
            out["rope_factor"] = float(rope.get("factor", 1.0))
            for k in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                if k in rope and rope[k] is not None:
                    out[k] = rope[k]
        elif rope_type not in ("default", None):
            raise ConfigError(f"rope_scaling type {rope_type!r} is not supported (only 'yarn' or none)")
        elif not official and not any(k in d for k in _FLAT_ROPE if k != "rope_theta"):
            out["rope_factor"] = 1.0
        if d.get("q_lora_rank") is None and "q_lora_rank" in d:
            d["q_lora_rank"] = 0
        if d.get("model_type") == "deepseek_v2" or d.get("scoring_func") == "softmax":
            d.setdefault("scoring_func", "softmax")
            d.setdefault("topk_method", "greedy")
            d.setdefault("norm_topk_prob", False)
            d.setdefault("num_nextn_predict_layers", 0)
        if "n_routed_experts" in d and d.get("n_routed_experts") is None:
            d["n_routed_experts"] = 0
        known = {f.name for f in fields(cls)}
        for k, v in d.items():
            if k in known and k not in out and v is not None:
                out[k] = v
        for k in ("original_max_position_embeddings", "n_group", "topk_group"):
            if k in out and isinstance(out[k], float) and out[k].is_integer():
                out[k] = int(out[k])
        out["name"] = name
        return cls(**out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d, name=path.parent.name if path.name == "config.json" else path.stem)


_FLAT_ROPE = ("rope_theta", "rope_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim")

def _from_official(d: dict) -> dict:
    """DeepSeek's own inference config (`inference/configs/config_*.json`, `ModelArgs` names) -> HF names.
    Fields a file omits take the official `ModelArgs` defaults, not V3's; the gate follows the official
    `Gate`: a selection bias (noaux_tc) only at dim 7168, group score max without it, weights
    renormalised only for sigmoid scores; YaRN only when max_seq_len exceeds original_seq_len; no MTP
    (the official inference code builds none)."""
    d = {**_OFFICIAL_DEFAULTS, **d}
    d["mscale_all_dim"] = d["mscale"]   # official `mscale` is the softmax correction (HF mscale_all_dim)
    for official_name, hf in _OFFICIAL_NAMES.items():
        if official_name in d:
            d[hf] = d.pop(official_name)
    d["max_position_embeddings"] = d.pop("max_seq_len")
    d["scoring_func"] = d.pop("score_func")
    if d["hidden_size"] == 7168:
        d["topk_method"] = "noaux_tc"
    else:
        d["topk_method"] = "group_limited_greedy" if d["n_group"] > 1 else "greedy"
    d["norm_topk_prob"] = d["scoring_func"] == "sigmoid"
    if d["max_position_embeddings"] <= d["original_max_position_embeddings"]:
        d["rope_factor"] = 1.0
    return d


# official DeepSeek inference `ModelArgs` (inference/model.py) defaults, in its own names
_OFFICIAL_DEFAULTS = {
    "max_seq_len": 4096 * 4, "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408,
    "n_layers": 27, "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
    "n_activated_experts": 6, "n_expert_groups": 1, "n_limited_groups": 1, "score_func": "softmax",
    "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "original_seq_len": 4096, "rope_theta": 10000.0, "rope_factor": 40.0, "beta_fast": 32,
    "beta_slow": 1, "mscale": 1.0, "num_nextn_predict_layers": 0,
}

# official DeepSeek inference `ModelArgs` name -> HF / nanoseek name
_OFFICIAL_NAMES = {
    "dim": "hidden_size", "inter_dim": "intermediate_size", "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers", "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok", "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor", "original_seq_len": "original_max_position_embeddings",
}


def list_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json")) + sorted(PRESET_ALIASES)


def load_preset(name_or_path: str, **overrides) -> ModelConfig:
    """A preset name (`tiny`, `small`, `v3`, ...), a JSON file, or an HF model directory."""
    p = Path(name_or_path)
    if p.is_dir() or (p.suffix == ".json" and p.exists()):
        cfg = ModelConfig.load(p)
    else:
        key = PRESET_ALIASES.get(name_or_path, name_or_path)
        path = CONFIG_DIR / f"{key}.json"
        if not path.exists():
            raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(list_presets())} "
                              "or pass a config.json / model directory")
        d = json.loads(path.read_text())
        d.pop("_comment", None)
        cfg = ModelConfig.from_hf_dict(d, name=name_or_path)
    return cfg.replace(**overrides) if overrides else cfg
