import pytest
import torch

from conftest import randomize, random_cfg
from nanoseek.model import Transformer
from nanoseek.model.moe import moe_reference, route


def _moe(**kw):
    torch.manual_seed(0)
    model = randomize(Transformer(random_cfg(**kw)))
    return model.layers[-1].ffn


@pytest.mark.parametrize("impl", ["padded", "loop", "grouped", "dense", "gather"])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_fast_paths_equal_per_token_reference(impl, T):
    moe = _moe().eval()
    moe.impl = impl
    x = torch.randn(T, moe.cfg.hidden_size)
    with torch.no_grad():
        assert (moe(x) - moe_reference(moe, x)).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["padded", "loop", "grouped"])
def test_training_path_gradients_match_reference(impl):
    moe = _moe()
    moe.impl = impl
    x = torch.randn(40, moe.cfg.hidden_size, requires_grad=True)
    if impl == "padded":          # the padded layout itself runs (not its fallback to the loop)
        with torch.no_grad():
            moe.gate.bias.zero_()     # the random bias makes one expert take 30% of the pairs
        idx = moe.gate(x)[1]
        assert moe.cfg.n_routed_experts * torch.bincount(idx.flatten()).max() <= 2 * idx.numel()
    moe(x).square().sum().backward()
    g_fast = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    moe_reference(moe, x2).square().sum().backward()
    for a, (name, p) in zip(g_fast, moe.named_parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5), name
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_grouped_bf16_segments_padded_equal_padded_path():
    """Under bf16 autocast the grouped path pads each expert's segment to 32 rows: outputs and every
    gradient equal the padded-batch path's (the same bf16 GEMMs, laid out differently)."""
    moe = _moe()
    x = torch.randn(70, moe.cfg.hidden_size)
    outs = {}
    for impl in ("grouped", "padded"):
        moe.impl = impl
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(xi)
        assert y.dtype == torch.float32
        y.square().sum().backward()
        outs[impl] = [y.detach(), xi.grad] + [p.grad.clone() for p in moe.parameters()]
    for a, b in zip(outs["grouped"], outs["padded"]):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()
    assert moe.choose_impl(70, grad=True) == "padded"           # forced above; by default on CPU:
    moe.impl = None
    E = moe.cfg.n_routed_experts
    assert moe.choose_impl(70, grad=True) == "grouped"         # fp32: grouped at every size
    few, many = 1000 * E // moe.cfg.num_experts_per_tok, 1100 * E // moe.cfg.num_experts_per_tok
    assert moe.choose_impl(few, grad=True, dtype=torch.bfloat16) == "padded"    # bf16, < 1024 pairs per expert
    assert moe.choose_impl(many, grad=True, dtype=torch.bfloat16) == "grouped"


def test_grouped_static_rows_equal_exact_rows(monkeypatch):
    """The grouped layout without a host sync (a fixed row bound, the slack as zero rows in the last
    expert's segment; the default on GPUs) gives the exact layout's output and gradients (bf16 autocast,
    a router that leaves the last expert busy and one that leaves it empty)."""
    import nanoseek.model.moe as moe_mod
    moe = _moe()
    E, K = moe.cfg.n_routed_experts, moe.cfg.num_experts_per_tok
    x = torch.randn(70, moe.cfg.hidden_size)
    w = torch.rand(70, K)
    seen = []
    swiglu = moe_mod._grouped_swiglu

    def spy(xs, w13, w2, dt, offs):                 # the layout the grouped GEMMs got
        seen.append((xs.shape[0], int(offs[-1])))
        return swiglu(xs, w13, w2, dt, offs)
    monkeypatch.setattr(moe_mod, "_grouped_swiglu", spy)
    bound = -(-(70 * K + E * 31) // 32) * 32        # T*K + E*(pad_to-1), rounded up to pad_to = 32
    for last in (True, False):
        idx = torch.stack([torch.randperm(E - (0 if last else 1))[:K] for _ in range(70)])
        res = {}
        for static in (True, False):
            xi = x.clone().requires_grad_()
            w13, w2 = (p.detach().clone().requires_grad_() for p in (moe.experts.w13, moe.experts.w2))
            seen.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = moe_mod.sorted_experts(xi, w, idx, w13, w2, "grouped", static_rows=static)
            rows, end = seen[0]
            assert rows == end and (rows == bound) == static     # the last segment ends at the buffer's end
            y.float().square().sum().backward()
            res[static] = [y.detach().float(), xi.grad, w13.grad, w2.grad]
        for a, b in zip(res[True], res[False]):
            assert (a - b).abs().max() <= 1e-3 * b.abs().max()


@pytest.mark.parametrize("kw,dtype", [(dict(moe_intermediate_size=20), torch.bfloat16), (dict(hidden_size=50), torch.float32)])
def test_grouped_needs_16_byte_rows_else_padded(kw, dtype):
    """torch._grouped_mm wants every operand row on a 16-byte boundary: widths that are not (F = 20
    in bf16, D = 50 in fp32) take the padded path, and training through them works."""
    moe = _moe(**kw)
    T = 1100 * moe.cfg.n_routed_experts // moe.cfg.num_experts_per_tok
    assert moe.choose_impl(T, grad=True, dtype=dtype) == "padded"
    x = torch.randn(T, moe.cfg.hidden_size, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        moe(x).float().square().mean().backward()
    assert x.grad.isfinite().all()


def test_bias_changes_selection_not_weights():
    cfg = random_cfg(n_group=1, topk_group=1, num_experts_per_tok=2)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])
    w0, idx0, s = route(logits, torch.zeros(8), cfg)
    bias = torch.zeros(8)
    bias[7] = 10.0
    w1, idx1, _ = route(logits, bias, cfg)
    assert set(idx0[0].tolist()) == {0, 1} and 7 in idx1[0].tolist()
    # the weight of a selected expert comes from its unbiased sigmoid score
    chosen = idx1[0].tolist()
    expect = s[0, chosen] / s[0, chosen].sum() * cfg.routed_scaling_factor
    assert torch.allclose(w1[0], expect)


def test_group_limited_routing_uses_top2_sum_and_masks_with_minus_inf():
    cfg = random_cfg(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)
    # group 0 = experts 0,1 has the single best expert but group 2 has the best top-2 sum
    logits = torch.tensor([[5.0, -5.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0]])
    # large negative bias everywhere: with a 0-mask, dropped experts (score 0) would beat kept ones
    bias = torch.full((8,), -3.0)
    _, idx, _ = route(logits, bias, cfg)
    assert sorted(idx[0].tolist()) == [4, 5]


def test_expert_load_counted_only_in_training():
    moe = _moe()
    x = torch.randn(10, moe.cfg.hidden_size)
    moe.eval()
    moe(x)
    assert moe.expert_load.sum() == 0
    moe.train()
    moe(x)
    assert moe.expert_load.sum() == 10 * moe.cfg.num_experts_per_tok


def test_bias_stays_fp32_under_bf16_cast():
    moe = _moe()
    moe.gate.bias.fill_(1e-3 + 1e-6)
    moe.to(torch.bfloat16)
    assert moe.gate.bias.dtype == torch.float32 and moe.gate.bias[0].item() == pytest.approx(1e-3 + 1e-6)
    assert moe.experts.w13.dtype == torch.bfloat16


def test_row_gather_backward_is_index_select_backward():
    """RowGather (the grouped path's dispatch and combine) == index_select with zero rows, and its
    gathering backward == autograd's scatter-add (gradcheck in float64)."""
    from nanoseek.model.moe import RowGather
    torch.manual_seed(0)
    T, K, D = 5, 2, 3
    pair_rows = torch.randperm(12)[: T * K].view(T, K)            # each token's K rows of a 12-row layout
    src = torch.full((12,), -1)
    src[pair_rows.flatten()] = torch.arange(T).repeat_interleave(K)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = RowGather.apply(x, src, pair_rows)
    ref = torch.cat([x, torch.zeros(1, D, dtype=x.dtype)]).index_select(0, src.masked_fill(src < 0, T))
    assert torch.equal(y, ref)
    assert torch.autograd.gradcheck(lambda x: RowGather.apply(x, src, pair_rows), (x,))
    back = torch.full((12, 1), -1)                                  # the combine: padded rows -> pairs
    back[pair_rows.flatten(), 0] = torch.arange(T * K)
    ys = torch.randn(12, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda ys: RowGather.apply(ys, pair_rows.flatten(), back), (ys,))
    # as sorted_experts calls it: maps known to hold no -1 skip the appended zero row, same values
    assert torch.equal(RowGather.apply(x, src, pair_rows, True, False), y)
    assert torch.autograd.gradcheck(lambda x: RowGather.apply(x, src, pair_rows, True, False), (x,))
    assert torch.autograd.gradcheck(lambda ys: RowGather.apply(ys, pair_rows.flatten(), back, False, True), (ys,))
