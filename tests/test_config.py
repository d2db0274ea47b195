
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


def test_official_modelargs_names():
    # the shape of deepseek-ai/DeepSeek-V3 inference/configs/config_671B.json
    official = {"vocab_size": 129280, "dim": 7168, "inter_dim": 18432, "moe_inter_dim": 2048, "n_layers": 61,
                "n_dense_layers": 3, "n_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
                "n_activated_experts": 8, "n_expert_groups": 8, "n_limited_groups": 4, "route_scale": 2.5,
                "score_func": "sigmoid", "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128}
    cfg = ModelConfig.from_hf_dict(official)
    v3 = load_preset("v3")
    for f in ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok", "n_group",
              "topk_group", "routed_scaling_factor", "rope_factor"]:
        assert getattr(cfg, f) == getattr(v3, f), f


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
