"""The decode runner (nanoseek/inference/runner/) against the model it is derived from."""
import pytest
import torch
import torch.nn.functional as F

from conftest import randomize, random_cfg
from nanoseek.inference.cache import LatentCache
from nanoseek.inference.runner import DecodeRunner, gemm
from nanoseek.inference.runner import moe as rmoe
from nanoseek.inference.runner import weights as rweights
import nanoseek.inference.runner as runner_mod
from nanoseek.inference.runner.step import _linear
from nanoseek.inference.runner.weights import DecodeWeights
from nanoseek.model import Transformer
from nanoseek.model.moe import moe_reference, route

CPU = torch.device("cpu")
FP32 = gemm.available(CPU, (torch.float32,))       # fp32, mkl, onednn32, panel where built
ALL = gemm.available(CPU, (torch.float32, torch.bfloat16))


def _model(**kw):
    torch.manual_seed(0)
    return randomize(Transformer(random_cfg(**kw))).eval()


@pytest.mark.parametrize("kind", ALL)
def test_gemm_kernels_equal_linear(kind):
    torch.manual_seed(0)
    w32 = torch.randn(96, 48)
    dt = gemm.DTYPE[kind]
    w = w32.to(dt)
    for rows in (1, 8):
        x = torch.randn(rows, 48)
        packed = gemm.pack(w, kind, rows)
        assert (packed is None) == (kind not in gemm.PACKED)
        y = gemm.linear(x.to(dt), w, packed, kind)
        tol = 1e-5 if dt == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), F.linear(x.to(dt), w).float(), rtol=tol, atol=tol)
    x3 = torch.randn(2, 4, 48).to(dt)                       # leading dims are flattened and restored
    y3 = gemm.linear(x3, w, gemm.pack(w, kind, 8), kind)
    assert y3.shape == (2, 4, 96)


@pytest.mark.skipif("panel" not in FP32, reason="the panel kernel needs an x86-64 CPU with AVX2 and a C++ compiler")
def test_panel_kernel_every_tile_and_tail():
    """The panel kernel's tiles (4 panels at 1 row, 2 at 2, 1 at 3-4, row chunks of 4 beyond), a last panel
    with fewer than 16 real columns, K not a multiple of 8, a weight big enough to split over threads;
    and the same pack through the op's Python implementation."""
    torch.manual_seed(0)
    for N, K in ((100, 37), (16, 8), (5, 130), (1030, 64)):
        w = torch.randn(N, K)
        packed = gemm.pack(w, "panel", 1)
        assert packed.shape == (-(-N // 16), K, 16) and packed.is_contiguous()
        for rows in range(1, 10):
            x = torch.randn(rows, K)
            ref = F.linear(x, w)
            torch.testing.assert_close(gemm.linear(x, w, packed, "panel"), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gemm._packed_linear(x, packed, w, 2), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="panel kernel"):        # a pack of the wrong shape is refused
        gemm.linear(torch.randn(2, 37), torch.randn(100, 37), torch.randn(7, 36, 16), "panel")
    with pytest.raises(RuntimeError, match="panel kernel"):        # ... or one panel too many for the weight
        gemm.linear(torch.randn(2, 37), torch.randn(100, 37), torch.randn(8, 37, 16), "panel")


def test_kernel_choice_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    calls = []
    real = gemm.best_time
    monkeypatch.setattr(gemm, "best_time", lambda fn, **kw: calls.append(1) or real(fn, **kw))
    kinds = ["fp32", "bf16"]
    first = gemm.fastest(CPU, 8, 64, 96, kinds)
    assert first in kinds and len(calls) == 2 * gemm.ROUNDS and (tmp_path / "calibration.json").exists()
    assert gemm.fastest(CPU, 8, 64, 96, kinds) == first and len(calls) == 2 * gemm.ROUNDS      # from the cache
    assert gemm.fastest(CPU, 8, 64, 96, ["fp32"]) == "fp32"                     # one candidate: no timing


@pytest.mark.parametrize("kw", [{}, dict(n_group=1, topk_group=1),
                                dict(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False),
                                dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1)])
def test_topk_free_routing_equals_route(kw):
    """route_dense (rank counting, fusable) selects and weights like route (topk)."""
    moe = _model(**kw).layers[-1].ffn
    logits = torch.randn(50, moe.cfg.n_routed_experts)
    w, idx, _ = route(logits, moe.gate.bias, moe.cfg)
    want = torch.zeros_like(logits).scatter_(1, idx, w)
    assert torch.allclose(rmoe.route_dense(logits, moe.gate.bias, moe.cfg), want, atol=1e-6)


GROUPED = "panel" in FP32          # the grouped kernel exists where the panel kernel does


def only_rules(monkeypatch, grouped: bool = False):
    """Paths by choose_path's rules alone (grouped: always the grouped kernel), not by measurement."""
    monkeypatch.setattr(rweights, "grouped_pays", lambda *a: grouped)


@pytest.mark.parametrize("path,skew,compiled", [("dense", False, True), ("capacity", False, True),
                                                ("capacity", True, True), ("gather", False, False),
                                                ("capacity", True, False), ("dense", False, False)] +
                         ([("grouped", True, True), ("grouped", False, False)] if GROUPED else []))
def test_moe_decode_paths_equal_reference(path, skew, compiled, monkeypatch):
    """Every MoE decode path (eager and compiled) equals the per-token reference, also after an in-place
    weight update. `skew`: a router bias sends every token to expert 0. Eager, the capacity path sizes
    itself to that load and drops nothing; compiled, a fixed capacity (8 rows for 12 tokens) cannot hold
    it, and the step reports the load that exceeds it. The grouped kernel has no capacity: one expert
    with every row, compiled, is exact."""
    torch._dynamo.reset()
    model = _model()
    i = len(model.layers) - 1
    moe = model.layers[i].ffn
    T = 1 if path == "gather" else 12
    monkeypatch.setattr(rmoe, "DENSE_MAX_TOKENS", 16 if path == "dense" else 0)
    only_rules(monkeypatch, grouped=path == "grouped")
    if skew:
        with torch.no_grad():
            moe.gate.bias[0] = 100.0
    W = DecodeWeights(model, CPU, FP32)
    plan = W.plan(T)
    assert plan[f"moe{i}.path"] == path
    C = (8 if skew else rmoe.capacity(moe, T)) if compiled and path == "capacity" else None
    ran = []
    real = rmoe.capacity_experts
    monkeypatch.setattr(rmoe, "capacity_experts", lambda *a: ran.append(a[-1]) or real(*a))

    def f(x, tensors):
        flags = []
        out = rmoe.moe_decode(moe, i, x, _linear(tensors, plan), tensors, plan[f"moe{i}.path"], flags, C)
        return out, (torch.stack(flags).max() if flags else torch.tensor(0))
    if compiled:
        f = torch.compile(f, fullgraph=True, dynamic=False)
    x = torch.randn(T, moe.cfg.hidden_size)
    want = []
    with torch.no_grad():
        for _ in range(2):
            W.sync()
            out, load = f(x, W.tensors(T, plan))
            if skew and path == "capacity":
                assert int(load) == T                     # expert 0 takes every token
            want.append(max(8, -(-int(load) // 8) * 8))
            over = C is not None and int(load) > C
            assert over == (compiled and skew and path == "capacity")
            err = (out - moe_reference(moe, x)).abs().max()
            assert err > 1e-2 if over else err < 1e-5     # an overflowing capacity drops pairs: the load tells
            moe.experts.w2.mul_(-1.5)
            moe.shared.w13.weight.mul_(0.5)
    if not compiled:    # the eager capacity path ran, at the busiest expert's load rounded up to 8 rows
        assert ran == (want if path == "capacity" else [])


def test_compiled_step_with_capacity_overflow_reruns_eagerly(monkeypatch):
    """A compiled step whose capacity path overflowed is redone eagerly: the logits equal the model's.
    The graph holds no torch.cond, so inductor can cache it on disk (a bypass would recompile it in
    every process: ~19 s for the benchmark model's batch-64 bucket). (The compiled capacity path
    without an overflow: test_moe_decode_paths_equal_reference for the layer, and in a whole compiled
    step test_engine.py's test_compiled_decode_equals_eager_and_sees_weight_updates at batch 8.)"""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setattr(rmoe, "DENSE_MAX_TOKENS", 0)
    only_rules(monkeypatch)
    monkeypatch.setattr(rmoe, "capacity", lambda moe, T, device_type="cpu": 1)
    logits, full, _, _, runner = _prefill_then_step(_model(num_hidden_layers=2), (torch.float32,), compile=True,
                                                  with_runner=True)
    assert (logits - full).abs().max() < 1e-4
    assert runner.stats["overflow_reruns"] == 1 and runner.stats["compiled_steps"] == 1
    assert "fxgraph_cache_bypass" not in counters["inductor"], dict(counters["inductor"])


@pytest.mark.parametrize("path", ["gather", "capacity", "dense"])
def test_fp8_weight_moe_decode_paths_follow_the_quantized_model(path, monkeypatch):
    """Weight-only FP8 (`quantize_weights`): each MoE decode path over the runner's e4m3 stacks equals
    the per-token reference of the quantized model (gather and capacity dequantize the same blocks; the
    fused dense GEMMs re-quantize the stacked matrix, so they agree to FP8 noise)."""
    from nanoseek.quant.fp8 import calc_diff
    from nanoseek.quant.fp8_weights import quantize_weights
    model = _model(initializer_range=0.02)
    quantize_weights(model)
    i = len(model.layers) - 1
    moe = model.layers[i].ffn
    T = 1 if path == "gather" else 12
    monkeypatch.setattr(rmoe, "DENSE_MAX_TOKENS", 16 if path == "dense" else 0)
    only_rules(monkeypatch, grouped=path == "grouped")
    W = DecodeWeights(model, CPU, ["fp8"])
    plan = W.plan(T)
    assert plan[f"moe{i}.path"] == path
    x = torch.randn(T, moe.cfg.hidden_size)
    with torch.no_grad():
        got = rmoe.moe_decode(moe, i, x, _linear(W.tensors(T, plan), plan), W.tensors(T, plan), path)
        diff = calc_diff(got, moe_reference(moe, x))
    assert diff < (2e-3 if path == "dense" else 1e-4), diff


def _prefill_then_step(model, runner_dtypes, prompt_len=6, compile=False, with_runner=False):
    """Prefill with the model, then one decode step through the runner's step (eager unless `compile`):
    its logits and the model's full-recompute logits for the same token."""
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (3, prompt_len + 1))
    cache = LatentCache(cfg.num_hidden_layers, 4, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                        model.head.weight.dtype)
    runner = DecodeRunner(model, cache, runner_dtypes, compile=compile, max_batch=4)
    with torch.no_grad():
        cache.begin(torch.zeros(3, dtype=torch.long), prompt_len)
        model.hidden(ids[:, :prompt_len], cache.positions, cache)
        logits, tokens, logps, _ = runner.decode(ids[:, prompt_len].tolist(), [prompt_len] * 3)
        full = model(ids)[:, -1]
    return (logits, full, tokens, logps) + ((runner,) if with_runner else ())


@pytest.mark.parametrize("kw", [{}, dict(q_lora_rank=0), dict(kv_lora_rank=64)])
def test_decode_step_equals_model_forward(kw):
    """Folded attention (small kv_lora_rank, with and without q-LoRA) and the model's own absorbed
    attention (large kv_lora_rank: folding does not pay) both give the model's logits."""
    model = _model(**kw)
    logits, full, tokens, logps = _prefill_then_step(model, (torch.float32,))
    assert (logits - full).abs().max() < 1e-4
    assert torch.equal(tokens, full.argmax(-1))
    torch.testing.assert_close(logps, full.log_softmax(-1).max(-1).values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", FP32)
def test_every_fp32_kernel_through_the_whole_step_equals_model_forward(kind, monkeypatch):
    """Each fp32 GEMM kernel, forced on every GEMM of the step (the calibration picks per host, so a test
    that lets it choose may never run some of them), gives the model's logits."""
    monkeypatch.setattr(gemm, "fastest", lambda device, rows, K, N, kinds, measured=None:
                        kind if kind in kinds else kinds[0])
    logits, full, _, _, runner = _prefill_then_step(_model(), (torch.float32,), with_runner=True)
    plan = runner.plan(runner.bucket(3))
    assert {v for n, v in plan.items() if not n.endswith((".path", ".experts", ".router", ".capacity"))} == {kind}  # router: fp32
    assert runner.stats["eager_steps"] == 1
    assert (logits - full).abs().max() < 1e-4


def test_packed_kernels_in_one_compiled_step_equal_model_forward(monkeypatch):
    """The packed kernels, which the compiled step calls as C++ ops, dealt out in turn to the step's
    GEMMs (as a host's calibration mixes them), and the grouped expert kernel where it is built: one
    compiled graph calls every one of them and gives the model's logits (one graph, not one per kernel:
    each costs ~25 s to compile on a fresh clone)."""
    import itertools
    torch._dynamo.reset()
    packed, turn = [k for k in FP32 if k in gemm.PACKED], itertools.count()

    def deal(device, rows, K, N, kinds, measured=None):
        mine = [k for k in packed if k in kinds]
        return mine[next(turn) % len(mine)] if mine else kinds[0]
    monkeypatch.setattr(gemm, "fastest", deal)
    only_rules(monkeypatch, grouped=GROUPED)
    logits, full, _, _, runner = _prefill_then_step(_model(num_hidden_layers=2), (torch.float32,), compile=True,
                                                  with_runner=True)
    plan = runner.plan(runner.bucket(3))
    assert plan["moe1.path"] == ("grouped" if GROUPED else "dense")
    assert {v for n, v in plan.items() if not n.endswith((".path", ".experts", ".router", ".capacity"))} == set(packed)
    assert runner.stats["compiled_steps"] == 1
    assert (logits - full).abs().max() < 1e-4


@pytest.mark.skipif(not GROUPED, reason="the grouped kernel is built where the panel kernel is (x86-64, AVX2)")
def test_grouped_kernel_equals_per_row_products():
    """nanoseek::grouped_linear (C++) and its torch reference == each row times its expert's weight:
    experts with no rows, one expert with every row, widths that leave a part-filled panel."""
    g = torch.Generator().manual_seed(0)
    for E, N, K, P, skew in [(16, 256, 256, 32, False), (8, 40, 24, 12, False), (5, 37, 19, 9, True),
                             (4, 16, 8, 1, False)]:
        w = torch.randn(E, N, K, generator=g)
        expert = torch.zeros(P, dtype=torch.long) if skew else torch.randint(0, E, (P,), generator=g).sort().values
        counts = torch.bincount(expert, minlength=E)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        x = torch.randn(P, K, generator=g)
        want = torch.einsum("pnk,pk->pn", w[expert], x)
        packs = gemm.pack(w, "panel", P)
        torch.testing.assert_close(gemm.grouped_linear(x, packs, offsets, N), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gemm._grouped_linear(x, packs, offsets, N), want, rtol=1e-5, atol=1e-4)


def test_grouped_path_only_for_layers_small_enough_to_copy(monkeypatch):
    """The grouped packs are an fp32 copy of a layer's experts: above the copy bound the layer keeps the
    rules' path, and nothing is measured (measuring allocates one more copy)."""
    model = _model()
    i = len(model.layers) - 1
    asked = []
    monkeypatch.setattr(rweights, "grouped_pays", lambda *a: asked.append(a) or True)
    small = DecodeWeights(model, CPU, ["fp32", "panel"])
    assert small.plan(12)[f"moe{i}.path"] == "grouped" and asked
    asked.clear()
    E, F2, D = model.layers[i].ffn.experts.w13.shape
    big = DecodeWeights(model, CPU, ["fp32", "panel"], dense_moe_max_bytes=E * F2 * D * 6 - 1)
    assert big.plan(12)[f"moe{i}.path"] != "grouped" and not asked


def test_decode_step_in_mixed_precision_is_close():
    """With every kernel allowed (bf16 GEMMs where faster here) the step stays close to fp32."""
    model = _model()
    logits, full, _, _ = _prefill_then_step(model, (torch.float32, torch.bfloat16))
    assert (logits - full).abs().max() < 0.05 * full.abs().max()


def test_runner_follows_optimizer_steps():
    """Derived weights follow in-place updates: through the per-step version check without an explicit
    sync, and through sync_weights() with the check off. With both removed the step reads stale weights
    (so this test fails if either mechanism breaks)."""
    model = _model()
    cfg = model.cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    cache = LatentCache(cfg.num_hidden_layers, 2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim, torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32,), compile=False, max_batch=2)

    def step():
        with torch.no_grad():
            cache.begin(torch.zeros(2, dtype=torch.long), 4)
            model.hidden(ids[:, :4], cache.positions, cache)
            return runner.decode(ids[:, 4].tolist(), [4, 4])[0], model(ids)[:, -1]

    def update():
        with torch.no_grad():
            for layer in model.layers:
                layer.attn.wkv_b.weight.mul_(1.3)
                (layer.ffn.experts.w13 if hasattr(layer.ffn, "experts") else layer.ffn.w13.weight).mul_(1.3)
            model.head.weight.mul_(-1.0)

    got, want = step()
    assert (got - want).abs().max() < 1e-4
    update()                                             # 1. no sync: the version check notices
    got, want = step()
    assert (got - want).abs().max() < 1e-4
    runner.check_versions = False
    update()                                             # 2. check off, explicit sync
    runner.sync_weights()
    got, want = step()
    assert (got - want).abs().max() < 1e-4
    update()                                             # 3. neither: stale
    got, want = step()
    assert (got - want).abs().max() > 1e-2


def test_two_runners_in_one_process_share_nothing():
    """Two engines on two different models, interleaved: each matches its own model."""
    from nanoseek.inference import LLM, SamplingParams
    a, b = _model(), _model(num_attention_heads=2)
    with torch.no_grad():
        b.head.weight.mul_(-1)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    la, lb = LLM(a, max_batch=4, max_len=32, compile=False), LLM(b, max_batch=4, max_len=32, compile=False)
    p = {"prompt_token_ids": [3, 4, 5, 6]}
    ra1, rb1, ra2 = la.generate(p, sp), lb.generate(p, sp), la.generate(p, sp)
    assert ra1[0].outputs[0].token_ids == ra2[0].outputs[0].token_ids
    ref = LLM(b, max_batch=1, max_len=32, compile=False).generate(p, sp)
    assert rb1[0].outputs[0].token_ids == ref[0].outputs[0].token_ids
    ra, rb = la.engine.runner, lb.engine.runner
    wa, wb = ra.weights.tensors(1, ra.plan(1)), rb.weights.tensors(1, rb.plan(1))
    assert not {t.data_ptr() for t in wa.values()} & {t.data_ptr() for t in wb.values()}


def test_auto_compile_waits_until_it_pays(monkeypatch):
    """compile="auto": a bucket is compiled only once its eager time reaches the expected compile time.
    (The policy, not inductor: the "compiled" step here is the eager function behind the same calls;
    compiled steps are checked against the model in the tests above.)"""
    model = _model()
    cfg = model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim, torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32,), compile="auto", max_batch=2)
    runner._graphs = {"decode": runner._decode_step, "spec": runner._spec_step}
    monkeypatch.setattr(runner, "_expected_compile_s", lambda kind, Bp: 1e9)
    with torch.no_grad():
        cache.begin(torch.zeros(2, dtype=torch.long), 3)
        model.hidden(torch.ones(2, 3, dtype=torch.long), cache.positions, cache)
        runner.decode([1, 2], [3, 3])
        assert runner.stats["eager_steps"] == 1 and not runner._compiled
        monkeypatch.setattr(runner, "_expected_compile_s", lambda kind, Bp: 0.0)
        runner.decode([1, 2], [4, 4])
    assert runner._compiled == {("decode", 2)} and runner.stats["compiled_steps"] == 1


@pytest.mark.parametrize("dense,eager_first", [(True, False), (False, False), (True, True)])
def test_compiled_capacity_follows_an_unbalanced_router(dense, eager_first, monkeypatch):
    """A router that sends every token to one expert overflows a compiled step's default capacity (2x
    the mean load): each such step is redone eagerly, and once FIT_STEPS loads are seen the bucket's
    plan moves those layers to the fused dense path (or, without dense weights, raises the capacity to
    the load), after which no step overflows. Loads seen in eager steps first (`eager_first`, as GRPO's
    "auto" rollouts run) fit the plan before the first compile: no overflow at all. Logits equal the
    model's throughout. (The policy, not inductor: the "compiled" step is the eager function behind the
    same calls, with the plan's fixed capacities.) Eager steps follow the move to the dense path."""
    monkeypatch.setattr(rmoe, "DENSE_MAX_TOKENS", 0)
    only_rules(monkeypatch)
    monkeypatch.setattr(runner_mod, "FIT_STEPS", 3)
    model = _model()
    cfg = model.cfg
    moes = [i for i, layer in enumerate(model.layers) if hasattr(layer.ffn, "experts")]
    with torch.no_grad():
        for i in moes:
            model.layers[i].ffn.gate.bias[0] = 100.0
    B = 32                                 # 32 x 3 pairs over 8 experts: a mean of 12, capacity 24
    cache = LatentCache(cfg.num_hidden_layers, B, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim, torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32,), compile="auto" if eager_first else True, max_batch=B)
    runner._graphs = {"decode": runner._decode_step, "spec": runner._spec_step}
    if not dense:
        for name in [n for n in runner.weights.gemms if ".dense_" in n]:
            del runner.weights.gemms[name]
    expected = {"v": 0.0 if not eager_first else 1e9}
    monkeypatch.setattr(runner, "_expected_compile_s", lambda kind, Bp: expected["v"])
    ids = torch.randint(0, cfg.vocab_size, (B, 4))
    with torch.no_grad():
        cache.begin(torch.zeros(B, dtype=torch.long), 3)
        model.hidden(ids[:, :3], cache.positions, cache)
        full = model(ids)[:, -1]
        for step in range(8):             # the same token at the same position: the cache row is rewritten
            if eager_first and step == 4:
                expected["v"] = 0.0
            logits = runner.decode(ids[:, 3].tolist(), [3] * B)[0]
            assert (logits - full).abs().max() < 1e-4, step
    plan = runner.plan(B)
    reruns = runner.stats["overflow_reruns"]
    assert reruns == (0 if eager_first else 3)
    assert runner.stats["compiled_steps"] == (4 if eager_first else 8)
    want = "dense" if dense else B                        # the load: every token
    assert runner.stats["capacity"]["decode32"] == {i: want for i in moes}
    for i in moes:
        assert plan[f"moe{i}.path"] == ("dense" if dense else "capacity")
        assert dense or plan[f"moe{i}.capacity"] == B
        # a compile time measured for the default graph is not this graph's
        assert f"{i}:{want}" in runner._compile_key("decode", B)
        # eager steps (an overflow's rerun, or before a compile) take the dense path too
        assert runner._eager_plans[(B, False)][f"moe{i}.path"] == ("dense" if dense else "capacity")


def test_auto_compile_with_a_known_horizon_weighs_the_steps_left(monkeypatch):
    """With the job's length known (GRPO's steps), "auto" compiles when the eager time per unit so far,
    times the units left, times the expected saving, exceeds twice the compile cost - not before, and
    not in the job's first unit (nothing measured yet)."""
    model = _model()
    cfg = model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim, torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32,), compile="auto", max_batch=2)
    monkeypatch.setattr(runner, "_expected_compile_s", lambda kind, Bp: 10.0)
    key = ("decode", 2)
    runner._saves[key] = 0.5                              # not what a run on this host may have measured
    runner._eager_s[(None, *key)] = 4.0                   # ski rental (no horizon): 4 < 10 s, not yet
    assert not runner._pays(key)
    runner.horizon = (0, 100, "rollout")
    assert not runner._pays(key)
    runner._eager_s[("rollout", *key)] = 4.0
    runner._eager_s[("eval", *key)] = 40.0                # another phase's time does not count
    runner.horizon = (2, 22, "rollout")                   # 2 s a unit x 20 left x 0.5 = 20: not more than 2 x 10
    assert not runner._pays(key)
    runner.horizon = (2, 23, "rollout")                   # 21 left: 21 s > 20
    assert runner._pays(key)
    runner.horizon = None
    runner._eager_s[(None, *key)] = 10.0
    assert runner._pays(key)


def test_auto_compile_uses_the_saving_measured_on_this_host(tmp_path, monkeypatch):
    """After SAVES_STEPS compiled steps of a bucket that also ran eagerly, the measured saving (1 -
    compiled / eager seconds per step) is stored per host, and a later runner weighs its horizon with
    it instead of COMPILED_SAVES."""
    import nanoseek.inference.runner as runner_mod
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    model = _model()
    cfg = model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim, torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32,), compile=False, max_batch=2)
    key = ("decode", 2)
    runner._eager_s[("rollout", *key)], runner._eager_n[key] = 8.0, 10              # 0.8 s an eager step
    for _ in range(runner_mod.SAVES_STEPS):
        runner._note_compiled_step(key, 0.6)                                         # 0.6 s compiled: saves 25%
    fresh = DecodeRunner(model, cache, (torch.float32,), compile=False, max_batch=2)
    assert fresh._expected_saves(*key) == pytest.approx(0.25)
    assert fresh._expected_saves("decode", 1) == runner_mod.COMPILED_SAVES           # not measured
    monkeypatch.setattr(fresh, "_expected_compile_s", lambda kind, Bp: 10.0)
    fresh._eager_s[("rollout", *key)] = 4.0
    fresh.horizon = (2, 23, "rollout")      # 2 s a unit x 21 left: x 0.5 = 21 > 20 would compile; x 0.25 does not
    assert not fresh._pays(key)
    fresh.horizon = (2, 43, "rollout")      # 41 left x 2 x 0.25 = 20.5 > 20
    assert fresh._pays(key)
    gpu = DecodeRunner(model, cache, (torch.float32,), compile=False, max_batch=2)
    gpu.device = torch.device("cuda")       # no measurement there yet: the CUDA priors (H200-measured)
    monkeypatch.setattr(runner_mod.calibrate, "lookup", lambda *a, **k: None)
    assert gpu._expected_saves("decode", 1) == runner_mod.CUDA_COMPILED_SAVES
    assert gpu._expected_compile_s("decode", 1) == runner_mod.CUDA_COLD_COMPILE_S


def test_in_place_sync_keeps_addresses_and_follows_the_model():
    """CUDA graphs read the derived weights at fixed addresses: with in_place, sync writes the new values
    into the tensors it made (same data_ptr, new values) and never into the model's own parameters."""
    model = _model()
    dw = DecodeWeights(model, CPU, ["fp32", "bf16"], in_place=True)
    plan = dw.plan(8)
    before = {k: (t.data_ptr(), t.clone()) for k, t in dw.tensors(8, plan).items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    dw.sync()
    after = dw.tensors(8, plan)
    moved = [k for k, t in after.items() if t.data_ptr() != before[k][0]]
    assert not moved
    changed = [k for k, t in after.items() if not torch.equal(t, before[k][1])]
    assert len(changed) == len(after)                       # every derived tensor follows the update
    for n, p in model.named_parameters():                   # and the parameters hold exactly the update
        assert torch.equal(p, params[n] * 1.5), n
    other = DecodeWeights(model, CPU, ["fp32", "bf16"])
    assert other.plan(8) == plan
    fresh = other.tensors(8, plan)
    for k, t in after.items():
        assert torch.equal(t, fresh[k]), k


def test_bf16_model_with_unfolded_attention_decodes():
    """A bf16 model whose attention does not fold (large kv_lora_rank, as V3's) runs the model's own
    absorbed attention in bf16 inside the step (the fp32 residual stream is cast at its input): it
    failed with a dtype error on the first decode step. Close to the model's own forward."""
    model = _model(kv_lora_rank=64).to(torch.bfloat16)
    logits, full, _, _ = _prefill_then_step(model, (torch.bfloat16,))
    full = full.float()
    assert (logits - full).abs().max() < 0.05 * full.abs().max()


def test_capacity_is_larger_on_cuda():
    """The capacity path gives each expert 2x its mean load on CPU and 4x on CUDA (where padded rows
    are nearly free and overflow reruns are not); never fewer than 8 rows."""
    moe = _model().layers[1].ffn
    E, K = moe.cfg.n_routed_experts, moe.cfg.num_experts_per_tok
    T = 16 * E // K                                  # a mean load of 16 pairs per expert
    assert rmoe.capacity(moe, T) == 32 and rmoe.capacity(moe, T, "cuda") == 64
    assert rmoe.capacity(moe, 1) == rmoe.capacity(moe, 1, "cuda") == 8


def test_in_place_sync_never_writes_into_a_replaced_parameter():
    """Where a derived tensor is a parameter itself (an fp32 weight read as it is) and the model swaps
    that parameter for a new one, sync takes the new one and leaves the old one alone (something else,
    an optimizer say, may still hold it)."""
    model = _model()
    dw = DecodeWeights(model, CPU, ["fp32"], in_place=True)
    plan = dw.plan(8)
    gate = model.layers[1].ffn.gate
    old = gate.weight
    assert dw.tensors(8, plan)["moe1.router"] is old          # the live parameter, borrowed
    before = old.detach().clone()
    gate.weight = torch.nn.Parameter(torch.randn_like(old))
    dw.sync()
    assert dw.tensors(8, plan)["moe1.router"] is gate.weight
    assert torch.equal(old, before)


def test_expected_compile_time_is_keyed_by_the_traced_code(tmp_path, monkeypatch):
    """A compile time measured for one version of the step's code says nothing about another (the new
    code misses inductor's cache): after a code change the runner expects a cold compile again."""
    import nanoseek.inference.runner as runner_mod
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    assert len(runner_mod.traced_code_version()) == 12
    model = _model()
    cfg = model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 2, 32, cfg.kv_lora_rank + cfg.qk_rope_head_dim, torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32,), compile=False, max_batch=2)
    from nanoseek import calibrate
    calibrate.store(CPU, runner._compile_key("decode", 2), 1.5)
    assert runner._expected_compile_s("decode", 2) == 1.5
    monkeypatch.setattr(runner_mod, "traced_code_version", lambda: "edited")
    fresh = DecodeRunner(model, cache, (torch.float32,), compile=False, max_batch=2)
    assert fresh._expected_compile_s("decode", 2) == runner_mod.COLD_COMPILE_S
