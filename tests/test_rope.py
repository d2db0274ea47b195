import math

import torch

from nanoseek.config import load_preset
from nanoseek.model.rope import apply_rope, inv_freq, rope_cos_sin


def test_yarn_v3_closed_form():
    """The spec's closed form: pairs 0..10 unchanged, 23..31 divided by 40, a linear blend between."""
    cfg = load_preset("v3")
    w = inv_freq(cfg)
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    low, high = 10, 23
    for j in range(32):
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        expect = base[j] * ((1 - ramp) + ramp / 40)
        assert math.isclose(w[j].item(), expect.item(), rel_tol=1e-6), j
    assert math.isclose(w[11].item() / base[11].item(), 1 - (1 / 13) * (1 - 1 / 40), rel_tol=1e-6)


def test_yarn_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = load_preset("v3")
    hf = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    hf_freq, attn_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    assert torch.allclose(inv_freq(cfg), hf_freq, rtol=1e-6)
    assert attn_factor == 1.0


def test_no_yarn_is_plain_rope():
    cfg = load_preset("tiny")
    d = cfg.qk_rope_head_dim
    assert torch.allclose(inv_freq(cfg), 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2).float() / d)))


def test_rotation_is_complex_multiplication_of_adjacent_pairs():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    pos = torch.arange(5).unsqueeze(0)
    freqs = inv_freq(load_preset("tiny"))
    cos, sin = rope_cos_sin(pos, freqs)
    out = apply_rope(x, cos, sin)
    z = torch.view_as_complex(x.view(2, 5, 4, 2).contiguous())
    ref = torch.view_as_real(z * torch.polar(torch.ones(5, 4), pos[0, :, None].float() * freqs)).flatten(-2)
    assert torch.allclose(out, ref, atol=1e-6)
