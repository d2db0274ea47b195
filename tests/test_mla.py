import pytest
import torch

from conftest import randomize, random_cfg
from nanoseek.model import Transformer


class ListCache:
    """The simplest LatentCache: grow per-layer tensors (batch of equal-length sequences)."""

    def __init__(self):
        self.kv, self.pe = {}, {}

    def update(self, layer, kv, pe):
        T = kv.shape[1]
        if layer in self.kv:
            kv = torch.cat([self.kv[layer], kv], dim=1)
            pe = torch.cat([self.pe[layer], pe], dim=1)
        self.kv[layer], self.pe[layer] = kv, pe
        S = kv.shape[1]
        return torch.cat([kv, pe], dim=-1), torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]


def _model(**kw):
    torch.manual_seed(0)
    return randomize(Transformer(random_cfg(**kw)).eval())


def test_absorbed_equals_naive_full_sequence():
    model = _model()
    attn = model.layers[0].attn
    x = torch.randn(2, 11, model.cfg.hidden_size)
    rot = model.rope(torch.arange(11)[None])
    with torch.no_grad():
        a = attn(x, rot, absorb=False)
        b = attn(x, rot, absorb=True)
    assert (a - b).abs().max() < 1e-5


def test_absorbed_equals_naive_without_q_lora():
    model = _model(q_lora_rank=0)
    attn = model.layers[1].attn
    x = torch.randn(1, 7, model.cfg.hidden_size)
    rot = model.rope(torch.arange(7)[None])
    with torch.no_grad():
        assert (attn(x, rot, absorb=False) - attn(x, rot, absorb=True)).abs().max() < 1e-5


def test_cached_decode_equals_full_recompute():
    """Prefill 6 tokens, then decode 5 one at a time from the latent cache: same logits as no cache."""
    model = _model()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 11))
    cache = ListCache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :6], torch.arange(6)[None], cache)]
        for t in range(6, 11):
            steps.append(model(ids[:, t:t + 1], torch.tensor([[t]]), cache))
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    # the cache holds only C + R numbers per token per layer
    cfg = model.cfg
    assert cache.kv[0].shape[-1] + cache.pe[0].shape[-1] == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_document_mask_equals_separate_sequences():
    """Two documents packed in one row with document masking == each run on its own from position 0."""
    from nanoseek.data.loader import document_mask
    model = _model()
    bos = model.cfg.bos_token_id
    d1 = torch.tensor([[bos, 5, 6, 7, 8]])
    d2 = torch.tensor([[bos, 9, 10, 11]])
    packed = torch.cat([d1, d2], dim=1)
    positions, mask = document_mask(packed, bos)
    with torch.no_grad():
        both = model.logits(model.hidden(packed, positions, mask=mask))
        a, b = model(d1), model(d2)
    assert (both[:, :5] - a).abs().max() < 1e-5 and (both[:, 5:] - b).abs().max() < 1e-5


def test_fused_attention_equals_manual_with_masks():
    """The GPU's SDPA path (fused_attention) and the CPU's two-GEMM path agree, forward and backward, on
    MLA's shapes (v narrower than q/k): causal (also over more keys than queries: aligned to the last
    key), a document mask (bool), and an additive cache mask."""
    from nanoseek.data.loader import document_mask
    from nanoseek.model.mla import additive_mask, fused_attention, manual_attention

    torch.manual_seed(0)
    B, H, T, QK, V = 2, 3, 12, 24, 16
    ids = torch.randint(3, 50, (B, T))
    ids[0, 5] = ids[1, 0] = ids[1, 7] = 1                       # documents start at bos (id 1)
    doc = document_mask(ids, 1)[1]
    cache = additive_mask(torch.ones(T, T + 4, dtype=torch.bool).tril(4)[None, None], T, T + 4, "cpu")
    for mask, S in ((None, T), (None, T + 4), (doc, T), (cache, T + 4)):
        q, k, v = (torch.randn(B, H, n, d, requires_grad=True) for n, d in ((T, QK), (S, QK), (S, V)))
        outs = []
        for fn in (fused_attention, manual_attention):
            o = fn(q, k, v, mask, 0.3)
            g = torch.autograd.grad(o.square().sum(), (q, k, v))
            outs.append((o, *g))
        for a, b in zip(*outs):
            assert (a - b).abs().max() < 1e-5


def test_manual_attention_bf16_softmax_matches_fp32_reference():
    """Under bf16 the CPU path's softmax runs in bf16 (accumulating in fp32): its output and gradients stay
    within bf16 rounding of the fp32 path on the same (bf16-representable) inputs, causal and masked."""
    from nanoseek.data.loader import document_mask
    from nanoseek.model.mla import manual_attention

    torch.manual_seed(0)
    B, H, T, QK, V = 2, 3, 24, 24, 16
    ids = torch.randint(3, 50, (B, T))
    ids[0, 9] = ids[1, 14] = 1
    doc = document_mask(ids, 1)[1]
    for mask in (None, doc):
        base = [torch.randn(B, H, T, d).bfloat16() for d in (QK, QK, V)]
        res = {}
        for dt in (torch.float32, torch.bfloat16):
            q, k, v = (t.to(dt).requires_grad_() for t in base)
            o = manual_attention(q, k, v, mask, 0.3)
            g = torch.autograd.grad(o.float().square().sum(), (q, k, v))
            res[dt] = [o.float(), *(x.float() for x in g)]
        for a, b in zip(res[torch.float32], res[torch.bfloat16]):
            assert ((a - b).abs().max() / a.abs().max()) < 2e-2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_document_mask_equals_dense():
    """The trainer's FlexAttention document mask (GPU default for long windows) gives the dense mask's
    attention and the same model output. Forward only: FlexAttention has no CPU backward (the GPU
    benchmark checks backward); eager flex here, the compiled kernel on the GPU."""
    from nanoseek.model.mla import manual_attention
    from nanoseek.train.flex_mask import DocumentMask, training_mask

    torch.manual_seed(0)
    B, H, T, QK, V = 2, 3, 700, 24, 16                           # 6 blocks of 128, the last a tail
    ids = torch.randint(3, 50, (B, T))
    ids[0, 0] = ids[0, 13] = ids[0, 400] = ids[1, 5] = ids[1, 30] = 1     # documents start at bos (id 1)
    positions, flex = training_mask(ids, 1, flex=True, compiled=False)
    dense_positions, dense = training_mask(ids, 1, flex=False)
    assert isinstance(flex, DocumentMask) and torch.equal(flex.dense(), dense)
    blocks = flex.block_mask
    assert int(blocks.full_kv_num_blocks.sum()) > 0 and int(blocks.kv_num_blocks.sum()) > 0   # both kinds occur
    assert torch.equal(positions, dense_positions)
    q, k, v = (torch.randn(B, H, T, d) for d in (QK, QK, V))
    assert (flex.attend(q, k, v, 0.3) - manual_attention(q, k, v, dense, 0.3)).abs().max() < 1e-5
    model = _model()
    with torch.no_grad():
        a = model.hidden(ids, positions, mask=flex)
        b = model.hidden(ids, positions, mask=dense)
    assert (a - b).abs().max() < 1e-5
    assert training_mask(ids, 1)[1].dtype == torch.bool          # CPU default: the dense mask


def test_flex_document_mask_in_compiled_blocks():
    """Compiled blocks (the trainer's --compile) with the FlexAttention mask compiled inside them == the
    eager model with the dense mask (forward; CPU inductor). One dense layer: the mask is the attention's,
    and each block kind costs its own cold compile."""
    from nanoseek.train.compiled import StepCompiler
    from nanoseek.train.flex_mask import training_mask

    model = _model(num_hidden_layers=1, first_k_dense_replace=1)
    ids = torch.randint(3, 50, (2, 256))
    ids[0, 0] = ids[0, 100] = 1
    positions, flex = training_mask(ids, 1, flex=True)
    dense = training_mask(ids, 1, flex=False)[1]
    with torch.no_grad():
        ref = model.hidden(ids, positions, mask=dense)
        StepCompiler(model, policy="on")
        assert (model.hidden(ids, positions, mask=flex) - ref).abs().max() < 1e-5


def test_single_document_rows_take_the_causal_kernel():
    """A window whose rows each hold one document (BOS only at a row's start, or none) gets CausalMask:
    SDPA's causal kernel, forward and backward equal to the dense document mask's, in the eager model
    and inside compiled blocks (the sdpa_kernel priority traced by dynamo). A second document in any
    row keeps the FlexAttention rule."""
    from nanoseek.model.mla import manual_attention
    from nanoseek.train.compiled import StepCompiler
    from nanoseek.train.flex_mask import CausalMask, DocumentMask, training_mask

    torch.manual_seed(0)
    ids = torch.randint(3, 50, (2, 256))
    ids[0, 0] = 1                                                   # row 0 starts with BOS, row 1 has none
    positions, causal = training_mask(ids, 1, flex=True)
    dense_positions, dense = training_mask(ids, 1, flex=False)
    assert isinstance(causal, CausalMask) and torch.equal(positions, dense_positions)
    q, k, v = (torch.randn(2, 3, 256, d, requires_grad=True) for d in (24, 24, 16))
    g = torch.randn(2, 3, 256, 16)
    a = causal.attend(q, k, v, 0.3)
    da = torch.autograd.grad(a, (q, k, v), g)
    b = manual_attention(q, k, v, dense, 0.3)
    db = torch.autograd.grad(b, (q, k, v), g)
    assert (a - b).abs().max() < 1e-5
    assert all((x - y).abs().max() < 1e-5 for x, y in zip(da, db))
    model = _model(num_hidden_layers=1, first_k_dense_replace=1)           # one block kind to compile
    with torch.no_grad():
        ref = model.hidden(ids, positions, mask=dense)
        assert (model.hidden(ids, positions, mask=causal) - ref).abs().max() < 1e-5
        StepCompiler(model, policy="on")
        assert (model.hidden(ids, positions, mask=causal) - ref).abs().max() < 1e-5
    ids[1, 100] = 1                                                 # a second document in row 1
    assert isinstance(training_mask(ids, 1, flex=True, compiled=False)[1], DocumentMask)


def test_document_block_mask_equals_create_block_mask():
    """The block mask built from document extents == FlexAttention's own create_block_mask of the rule
    (which evaluates it at every pair), partial and full blocks alike."""
    from torch.nn.attention.flex_attention import create_block_mask
    from nanoseek.train.flex_mask import document_block_mask

    torch.manual_seed(0)
    for p in (0.0, 0.003, 0.02, 0.2):                             # one document per row .. many short ones
        doc = torch.cumsum(torch.rand(2, 512) < p, 1)
        ref = create_block_mask(lambda b, h, q, k: (doc[b, q] == doc[b, k]) & (k <= q), 2, None, 512, 512, device="cpu")
        got = document_block_mask(doc)
        assert torch.equal(got.to_dense(), ref.to_dense())
        assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks) and torch.equal(got.full_kv_num_blocks, ref.full_kv_num_blocks)
