import math

import pytest

from nanoseek.config import ConfigError, ModelConfig, load_preset


def test_presets_load_and_roundtrip_hf_json(tmp_path):
    for name in ["tiny", "v3", "v2-lite", "r1"]:
        cfg = load_preset(name)
        cfg.save(tmp_path / "config.json")
        again = ModelConfig.load(tmp_path)
        assert again == cfg, name


def test_v3_values():
    cfg = load_preset("v3")
    assert cfg.qk_head_dim == 192
    assert abs(cfg.softmax_scale - 0.135234) < 1e-6          # 192^-1/2 * (1 + 0.1 ln 40)^2


def test_v2_lite_softmax_scale():
    assert abs(load_preset("v2-lite").softmax_scale - 0.114723) < 1e-5


def test_hf_rope_scaling_and_rope_parameters_both_read():
    base = load_preset("v3").to_hf_dict()
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    new = {k: v for k, v in base.items() if k != "rope_scaling"}
    assert ModelConfig.from_hf_dict(old) == ModelConfig.from_hf_dict(new) == load_preset("v3")


# the shapes of deepseek-ai/DeepSeek-V3 inference/configs/config_{16B,236B,671B}.json
OFFICIAL = {
    "16B": {"vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408, "n_layers": 27,
            "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
            "n_activated_experts": 6, "route_scale": 1.0, "q_lora_rank": 0, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "mscale": 0.707},
    "236B": {"vocab_size": 102400, "dim": 5120, "inter_dim": 12288, "moe_inter_dim": 1536, "n_layers": 60,
             "n_dense_layers": 1, "n_heads": 128, "n_routed_experts": 160, "n_shared_experts": 2,
             "n_activated_experts": 6, "n_expert_groups": 8, "n_limited_groups": 3, "route_scale": 16.0,
             "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
             "v_head_dim": 128},
    "671B": {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
             "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
             "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
             "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
             "qk_rope_head_dim": 64, "v_head_dim": 128, "dtype": "fp8"},
}


def test_official_671b_config_is_v3():
    cfg = ModelConfig.from_hf_dict(OFFICIAL["671B"])
    v3 = load_preset("v3")
    for f in ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok", "n_group",
              "topk_group", "routed_scaling_factor", "rope_factor", "scoring_func", "topk_method", "norm_topk_prob",
              "softmax_scale"]:
        assert getattr(cfg, f) == getattr(v3, f), f


@pytest.mark.parametrize("size, gate", [
    ("16B", dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=1, topk_group=1)),
    ("236B", dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False, n_group=8,
                  topk_group=3)),
    ("671B", dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, n_group=8, topk_group=4)),
])
def test_official_configs_take_official_defaults(size, gate):
    """Fields the official files omit take the official ModelArgs defaults (softmax scores, one expert
    group, route_scale 1, max_seq_len 16384, no MTP), and the gate is the official Gate's: a selection
    bias only at dim 7168, group score max without it, weights renormalised only for sigmoid."""
    cfg = ModelConfig.from_hf_dict(OFFICIAL[size])
    for f, v in gate.items():
        assert getattr(cfg, f) == v, f
    assert cfg.max_position_embeddings == 16384 and cfg.rope_factor == 40.0 and cfg.num_nextn_predict_layers == 0
    assert cfg.routed_scaling_factor == OFFICIAL[size]["route_scale"]
    m = 0.1 * OFFICIAL[size].get("mscale", 1.0) * math.log(40.0) + 1.0          # official MLA softmax_scale
    assert cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5 * m * m)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg.replace(name="custom")      # round-trips via HF


def test_official_config_without_long_context_has_no_yarn():
    cfg = ModelConfig.from_hf_dict({**OFFICIAL["16B"], "max_seq_len": 4096})
    assert cfg.rope_factor == 1.0 and cfg.softmax_scale == pytest.approx(cfg.qk_head_dim ** -0.5)


@pytest.mark.parametrize("change, field", [
    (dict(topk_group=9), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=200), "num_experts_per_tok"),
    (dict(first_k_dense_replace=99), "first_k_dense_replace"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(num_attention_heads=2.5), "num_attention_heads"),
    (dict(scoring_func="softmax"), "topk_method"),
])
def test_invalid_config_names_field(change, field):
    with pytest.raises(ConfigError, match=field):
        load_preset("v3", **change)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="tiny"):
        load_preset("v9")


def test_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(tmp_path)
