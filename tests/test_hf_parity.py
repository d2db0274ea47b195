"""nanoseek vs HF transformers' DeepseekV3ForCausalLM on random tiny configs, both directions."""
import json

import pytest
import torch

from conftest import randomize, random_cfg
import nanoseek
from nanoseek.model import Transformer

transformers = pytest.importorskip("transformers")

SHAPES = [
    dict(),                                                                     # YaRN + group-limited
    dict(q_lora_rank=0, num_hidden_layers=2, first_k_dense_replace=0),          # plain q_proj, all MoE
    dict(n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=2, rope_factor=1.0),
    dict(hidden_size=64, num_attention_heads=4, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
         n_routed_experts=16, n_group=8, topk_group=3, num_experts_per_tok=4, mscale=0.707, mscale_all_dim=0.707),
]


def hf_model(cfg, seed=0):
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(seed)
    m = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_((1 + 0.1 * torch.randn(p.shape, generator=g)) if p.dim() == 1
                    else 0.1 * torch.randn(p.shape, generator=g))
        for layer in m.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(0.5 * torch.randn(cfg.n_routed_experts, generator=g))
    return m


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_hf_save_nanoseek_load(tmp_path, shape):
    cfg = random_cfg(**SHAPES[shape])
    ref = hf_model(cfg, seed=shape)
    ref.save_pretrained(tmp_path)
    ours = nanoseek.from_pretrained(tmp_path)
    assert ours.cfg.num_nextn_predict_layers == 0     # transformers drops MTP on save
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_nanoseek_save_hf_load(tmp_path, shape):
    cfg = random_cfg(**SHAPES[shape])
    torch.manual_seed(shape)
    ours = randomize(Transformer(cfg), seed=shape).eval()
    nanoseek.save_pretrained(ours, tmp_path, max_shard_bytes=40_000)      # force several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff
    # and back into nanoseek, MTP included
    again = nanoseek.from_pretrained(tmp_path)
    assert again.cfg.num_nextn_predict_layers == 1
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_fused_expert_names_load(tmp_path):
    """transformers' in-memory fused layout (experts.gate_up_proj / down_proj) is read too."""
    from safetensors.torch import save_file
    cfg = random_cfg(num_nextn_predict_layers=0)
    ref = hf_model(cfg)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert any("experts.gate_up_proj" in k for k in ref.state_dict())
    ours = nanoseek.from_pretrained(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() <= 1e-4


def test_bf16_load_keeps_router_bias_fp32(tmp_path):
    cfg = random_cfg()
    nanoseek.save_pretrained(randomize(Transformer(cfg)), tmp_path)
    m = nanoseek.from_pretrained(tmp_path, dtype="bfloat16")
    assert m.layers[-1].ffn.gate.bias.dtype == torch.float32
    assert m.layers[-1].ffn.experts.w13.dtype == torch.bfloat16
