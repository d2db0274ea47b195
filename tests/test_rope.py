import math

import torch

from nanoseek.config import load_preset
from nanoseek.model.rope import apply_rope, inv_freq, rope_freqs


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


def test_rotation_rotates_adjacent_pairs():
    """Pair (x_2j, x_2j+1) turned by angle pos * w_j, written out with cos and sin."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    pos = torch.arange(5).unsqueeze(0)
    freqs = inv_freq(load_preset("tiny"))
    out = apply_rope(x, rope_freqs(pos, freqs))
    ang = pos[0, :, None].float() * freqs                       # (5, 4)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    ref = torch.stack([x0 * ang.cos() - x1 * ang.sin(), x1 * ang.cos() + x0 * ang.sin()], dim=-1).flatten(-2)
    assert torch.allclose(out, ref, atol=1e-6)
    heads = apply_rope(x.unsqueeze(2).expand(2, 5, 3, 8), rope_freqs(pos, freqs))   # broadcast over heads
    assert torch.allclose(heads[:, :, 1], ref, atol=1e-6)


def test_compiled_rotation_equals_eager():
    """Under torch.compile the rotation is real arithmetic (inductor has no complex codegen)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    rot = rope_freqs(torch.arange(5).unsqueeze(0), inv_freq(load_preset("tiny")))
    compiled = torch.compile(apply_rope, fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(x, rot), apply_rope(x, rot), atol=1e-6)
    assert torch.allclose(compiled(x[:, :, 0], rot), apply_rope(x[:, :, 0], rot), atol=1e-6)
