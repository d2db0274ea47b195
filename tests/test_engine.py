"""The inference engine against full recompute, HF transformers' generate, and its own contracts."""
import pytest
import torch

import nanoseek

from conftest import randomize, random_cfg
from nanoseek.common import UserError
from nanoseek.inference import LLM, SamplingParams
from nanoseek.model import Transformer

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    # two layers (one dense, one MoE): each layer adds ~10 s to a compiled step's cold compile here
    torch.manual_seed(0)
    return randomize(Transformer(random_cfg(num_hidden_layers=2, rope_factor=1.0, max_position_embeddings=256))).eval()


def prompts(n, lens=(5, 9, 3, 7, 12, 4)):
    g = torch.Generator().manual_seed(n)
    return [{"prompt_token_ids": torch.randint(2, 97, (lens[i % len(lens)],), generator=g).tolist()} for i in range(n)]


def greedy_reference(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(torch.tensor([ids]))[0, -1].argmax().item()
            ids.append(nxt)
            out.append(nxt)
    return out


def test_greedy_equals_full_recompute(model):
    ps = prompts(4)
    outs = LLM(model, max_batch=8, max_len=64).generate(ps, GREEDY)
    for p, o in zip(ps, outs):
        assert o.outputs[0].token_ids == greedy_reference(model, p["prompt_token_ids"], 16)
        assert o.outputs[0].finish_reason == "length"


def test_greedy_equals_hf_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = random_cfg(num_nextn_predict_layers=0)
    torch.manual_seed(1)
    nanoseek.save_pretrained(randomize(Transformer(cfg)), tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    llm = LLM(str(tmp_path), max_batch=8, max_len=64)
    for p in prompts(3):
        ids = torch.tensor([p["prompt_token_ids"]])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                          do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
        ours = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0].token_ids
        assert ours == ref


def test_continuous_batching_matches_isolated(model):
    """Requests that join a running batch at different times decode exactly as alone."""
    llm = LLM(model, max_batch=3, max_len=64)             # fewer slots than requests: queueing + compaction
    ps = prompts(6)
    params = [SamplingParams(temperature=0, max_tokens=4 + 3 * i, ignore_eos=True) for i in range(6)]
    together = llm.generate(ps, params)
    for p, sp, o in zip(ps, params, together):
        alone = LLM(model, max_batch=1, max_len=64).generate(p, sp)[0]
        assert o.outputs[0].token_ids == alone.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_across_batches(model):
    sp = SamplingParams(temperature=1.0, max_tokens=10, seed=123, n=2, ignore_eos=True)
    p = prompts(1)[0]
    a = LLM(model, max_batch=8, max_len=64).generate(p, sp)[0]
    b = LLM(model, max_batch=8, max_len=64).generate([prompts(3)[1], p, prompts(3)[2]], sp)[1]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert a.outputs[0].token_ids != a.outputs[1].token_ids      # the n samples differ


def test_stop_rules(model):
    llm = LLM(model, max_batch=4, max_len=64)
    p = prompts(1)[0]
    free = llm.generate(p, GREEDY)[0].outputs[0].token_ids
    stop_tok = free[5]
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_tok]))[0].outputs[0]
    assert o.token_ids == free[: free.index(stop_tok) + 1] and o.finish_reason == "stop"
    eng = llm.engine
    eng.eos_ids = {stop_tok}
    o = llm.generate(p, SamplingParams(temperature=0, max_tokens=16, min_tokens=10))[0].outputs[0]
    assert stop_tok not in o.token_ids[:10]
    eng.eos_ids = {model.cfg.eos_token_id}


def test_context_limit_and_bad_requests(model):
    llm = LLM(model, max_batch=4, max_len=32)
    with pytest.raises(UserError, match="context"):
        llm.generate({"prompt_token_ids": [3] * 40}, GREEDY)
    o = llm.generate({"prompt_token_ids": [3] * 25}, SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    assert o[0].outputs[0].finish_reason == "length" and len(o[0].outputs[0].token_ids) <= 7
    with pytest.raises(UserError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(UserError, match="vocab|\\[0"):
        llm.generate({"prompt_token_ids": [100000]}, GREEDY)
    with pytest.raises(UserError, match="compile"):
        LLM(model, compile="yes")


def test_cache_holds_only_the_latent(model):
    cfg = model.cfg
    llm = LLM(model, max_batch=4, max_len=64)
    cache = llm.engine.cache
    per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 4     # fp32 here
    assert cache.bytes_per_token() == per_token
    fp8 = LLM(model, max_batch=4, max_len=64, kv_cache_dtype="fp8").engine.cache
    assert fp8.bytes_per_token() == (cfg.kv_lora_rank + cfg.qk_rope_head_dim + 4) * cfg.num_hidden_layers


def test_fp8_cache_close_to_full_precision(model):
    ps = prompts(3)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    a = LLM(model, max_batch=4, max_len=64).generate(ps, sp)
    b = LLM(model, max_batch=4, max_len=64, kv_cache_dtype="fp8").generate(ps, sp)
    # first token comes from the prefill (no cache read): identical; later ones read the e4m3 cache
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0]
        assert abs(x.outputs[0].logprobs[1] - y.outputs[0].logprobs[1]) < 0.05


@pytest.mark.parametrize("compile", [False, True])
def test_speculative_greedy_identical(model, compile):
    """MTP speculative decoding (eager, and as the runner's compiled verify+draft step) emits plain
    greedy decoding's tokens, also when a sampled request shares the first steps (plain steps, then
    the MTP cache catches up)."""
    ps = prompts(2)                  # speculation runs for up to SPEC_MAX_ROWS = 2 rows
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    a = LLM(model, max_batch=8, max_len=64, compile=False).generate(ps, sp)
    spec = LLM(model, max_batch=8, max_len=64, speculative=True, compile=compile)
    b = spec.generate(ps, sp)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert spec.engine.stats["spec_drafts"] > 0
    sampled = SamplingParams(temperature=1.0, max_tokens=3, seed=1, ignore_eos=True)
    drafts = spec.engine.stats["spec_drafts"]
    c = spec.generate(ps + [prompts(1)[0]], [sp] * 2 + [sampled])     # 3 rows: plain steps first
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in c[:2]]
    assert spec.engine.stats["spec_drafts"] > drafts
    if compile:
        assert ("spec", 2) in spec.engine.runner._compiled


def test_compiled_decode_equals_eager_and_sees_weight_updates(monkeypatch):
    """The runner's torch.compile'd decode step (padded rows, dynamic attention span) gives the eager
    engine's greedy tokens, and reads the new weights after an in-place update (an optimizer step):
    folded MLA weights, fused MoE weights and packed weights must all follow."""
    from nanoseek.inference.runner import moe as rmoe
    from nanoseek.inference.runner import weights as rweights
    monkeypatch.setattr(rmoe, "DENSE_MAX_TOKENS", 4)      # batch 4: fused dense MoE; batch 8: capacity path
    monkeypatch.setattr(rweights, "grouped_pays", lambda *a: False)     # (not the grouped kernel: measured)
    torch.manual_seed(0)
    m = randomize(Transformer(random_cfg(num_hidden_layers=2, rope_factor=1.0, max_position_embeddings=64))).eval()
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)   # span 32 -> 64
    compiled = LLM(m, max_batch=8, max_len=64, compile=True, autocast_dtype="float32")
    assert compiled.engine.runner.bucket(3) == 4          # 3 rows run padded to 4
    for ps in (prompts(3), prompts(7), prompts(3)):   # the last reuses batch 4's graph after updates
        fast = compiled.generate(ps, sp)           # first: it alone must notice the weight update
        eager = LLM(m, max_batch=8, max_len=64, compile=False, autocast_dtype="float32").generate(ps, sp)
        for a, b in zip(eager, fast):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            assert max(abs(x - y) for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs)) < 1e-4
        with torch.no_grad():                                  # "optimizer step": every derived weight must follow
            for layer in m.layers:
                layer.attn.wkv_b.weight.mul_(1.5)
                w = layer.ffn.experts.w13 if hasattr(layer.ffn, "experts") else layer.ffn.w13.weight
                w.mul_(1.5)
            m.head.weight.mul_(-1.0)
    runner = compiled.engine.runner
    assert runner.stats["compiled_steps"] > 0 and runner.stats["eager_steps"] == 0 and not runner._failed
    assert runner._compiled == {("decode", 4), ("decode", 8)}


def test_step_after_the_last_sequence_is_finished_from_outside(model):
    """A stop string can end the last running sequence between steps: the next step is a no-op."""
    llm = LLM(model, max_batch=2, max_len=64)
    eng = llm.engine
    eng.add_request([3, 4, 5], SamplingParams(temperature=0, max_tokens=8))
    (seq,) = eng.step()
    eng.finish(seq)
    assert eng.step() == [] and not eng.has_work()


def test_penalties_and_biases_equal_a_per_sequence_reference():
    """process_logits on a batch == the definitions applied row by row: repetition over prompt + output
    (divide positive logits, multiply negative ones), presence/frequency over the output, then biases."""
    from nanoseek.inference.sampling import SamplingParams, process_logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 20, generator=g) * 3
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.5, frequency_penalty=1.5),
              SamplingParams(logit_bias={3: 10.0, 19: -5.0}), SamplingParams()]
    prompts = [[1, 2, 2], [4, 5], [6], [7, 8]]
    outputs = [[2, 9], [5, 5, 11], [12], [13]]
    got = process_logits(logits.clone(), params, prompts, outputs)
    want = logits.clone()
    for i, (p, pr, out) in enumerate(zip(params, prompts, outputs)):
        for t in set(pr + out):
            if p.repetition_penalty != 1:
                want[i, t] = want[i, t] / p.repetition_penalty if want[i, t] > 0 else want[i, t] * p.repetition_penalty
        for t in set(out):
            want[i, t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        for t, b in p.logit_bias.items():
            want[i, t] += b
    assert torch.allclose(got, want)


def test_logit_bias_and_min_p_reach_the_sampler(model):
    llm = LLM(model, max_batch=8, max_len=64)
    p = [{"prompt_token_ids": [1, 2, 3]}]
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={7: 100.0}))
    assert out[0].outputs[0].token_ids == [7] * 5
    greedy = llm.generate(p, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0].token_ids
    sampled = llm.generate(p, SamplingParams(n=3, temperature=1.5, max_tokens=6, ignore_eos=True, min_p=1.0, seed=1))
    assert all(o.token_ids == greedy for o in sampled[0].outputs)   # min_p = 1 keeps only the most likely token


def test_abort_costs_only_the_aborted_requests(model):
    """Aborting a request's 2048 queued siblings behind 20,000 other queued requests is O(2048): the
    queue is not rescanned per id (that was 45M comparisons, seconds). Aborted requests never run;
    the others run as if the aborted ones had never been queued."""
    import time
    llm = LLM(model, max_batch=4, compile=False)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2)
    for i in range(20_000):
        eng.add_request([1, 2], params, f"other{i}")
    victims = [f"victim{i}" for i in range(2048)]
    for rid in victims:
        eng.add_request([3, 4], params, rid)
    t = time.perf_counter()
    eng.abort(victims)
    assert time.perf_counter() - t < 0.05
    assert len(eng.queued) == 20_000
    eng.abort([f"other{i}" for i in range(2, 20_000)])
    eng.add_request([5, 6, 7], params, "last")
    done = {}
    while eng.has_work():
        for s in eng.step():
            if s.finish_reason:
                done[s.request_id] = s.out_ids
    assert set(done) == {"other0", "other1", "last"}
    eng.add_request([1, 2], params, "gone")
    eng.abort("gone")                                          # nothing left queued: the queue is emptied
    assert not eng.waiting and not eng.has_work()
    alone = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)[0].outputs[0].token_ids
    assert done["last"] == alone
    eng.add_request([1], params, "x")
    with pytest.raises(UserError, match="already in use"):
        eng.add_request([1], params, "x")
