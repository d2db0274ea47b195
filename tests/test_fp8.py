"""FP8 (nanoseek/quant/fp8.py): quantization error bounds, fine vs coarse scaling, the three GEMMs of
the FP8 linear against an independent tile-by-tile reference, the model conversion, FP8 checkpoints
in and out (transformers reads them), weight-only FP8 inference and bf16 AdamW moments."""
import json

import pytest
import torch
import torch.nn.functional as F

import nanoseek
from nanoseek.model import Transformer
from nanoseek.quant import fp8, fp8_weights
from conftest import randomize, random_cfg


def ref_quantize(x: torch.Tensor, br: int, bc: int, pow2: bool = False) -> torch.Tensor:
    """The dequantized values, one group at a time (the obvious loop the vectorised code must equal)."""
    out = torch.empty_like(x, dtype=torch.float32)
    R, C = x.shape
    for i in range(0, R, br):
        for j in range(0, C, bc):
            g = x[i:i + br, j:j + bc].float()
            s = max(float(g.abs().max()), 1e-4) / 448.0
            if pow2:
                s = 2.0 ** torch.ceil(torch.log2(torch.tensor(s))).item()
            out[i:i + br, j:j + bc] = (g / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return out


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (5, 7), (1, 128)])
@pytest.mark.parametrize("block", [fp8.ACT, fp8.WEIGHT, fp8.COL])
def test_quantize_error_bound_and_tails(shape, block):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 2, shape[1])     # channels of very different size
    q = fp8.quantize(x, block)
    assert q.q.dtype == torch.float8_e4m3fn and q.q.shape == x.shape
    assert q.scale.shape == (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    xh = fp8.dequantize(q)
    assert torch.equal(xh, ref_quantize(x, *block))
    # e4m3 rounds to nearest with 3 mantissa bits: relative error <= 2^-4 for normals, and the
    # subnormal step of the group's scale (2^-9 s) / 2 below 2^-6 s
    s = fp8.dequantize(fp8.QTensor(torch.ones_like(x).to(torch.float8_e4m3fn), q.scale, block))
    assert ((xh - x).abs() <= torch.maximum(x.abs() * 2 ** -4, s * 2 ** -10) * (1 + 1e-6)).all()
    assert (q.q.float().abs() <= 448).all()


def test_pow2_scales_and_zeros():
    x = torch.randn(64, 300)
    q = fp8.quantize(x, fp8.ACT, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(q.scale).round()), q.scale)            # UE8M0: powers of two
    assert torch.equal(fp8.dequantize(q), ref_quantize(x, 1, 128, pow2=True))
    assert (fp8.quantize(x, fp8.ACT).scale <= q.scale).all()                         # rounded up, never clips
    z = fp8.quantize(torch.zeros(3, 200), fp8.WEIGHT)
    assert torch.equal(fp8.dequantize(z), torch.zeros(3, 200))


def test_fine_grained_scaling_beats_per_tensor_with_token_outliers():
    """E4M3's normal range spans 448 / 2^-6 = 28,672x. With one scale per tensor, a few tokens that
    large ("massive activations") push every other token into the subnormals; 1x128 tiles keep each
    token's own range. Measured on the outputs of the ordinary tokens (calc_diff, DeepGEMM's metric):
    fine 6.9e-4 vs per-tensor 1.6e-3 at 1e4x outliers, 1.2e-2 at 3e4x."""
    g = torch.Generator().manual_seed(1)
    M, K, N = 512, 1024, 512
    x = torch.randn(M, K, generator=g)
    outliers = torch.randperm(M, generator=g)[:8]
    x[outliers] *= 3e4
    w = 0.02 * torch.randn(N, K, generator=g)
    ref = x @ w.T
    fine = fp8.matmul(fp8.quantize(x, fp8.ACT), fp8.quantize(w, fp8.WEIGHT), torch.float32)
    tensor = fp8.matmul(fp8.quantize(x, (M, K)), fp8.quantize(w, (N, K)), torch.float32)
    ordinary = torch.ones(M, dtype=torch.bool)
    ordinary[outliers] = False
    d_fine, d_tensor = fp8.calc_diff(fine[ordinary], ref[ordinary]), fp8.calc_diff(tensor[ordinary], ref[ordinary])
    assert d_fine < 1e-3, d_fine                                      # DeepGEMM's tolerance
    assert d_fine < 0.2 * d_tensor, (d_fine, d_tensor)
    assert fp8.calc_diff(fine, ref) < 1e-3


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("MKN", [(300, 200, 130), (64, 256, 384)])
def test_fp8_linear_three_gemms_equal_the_reference(MKN, pow2):
    M, K, N = MKN
    g = torch.Generator().manual_seed(2)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    w = (0.05 * torch.randn(N, K, generator=g)).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    y = fp8.fp8_linear(x, w, fp8.Recipe(pow2_scales=pow2))
    y.backward(dy)
    xh, wh = ref_quantize(x.detach(), 1, 128, pow2), ref_quantize(w.detach(), 128, 128, pow2)
    torch.testing.assert_close(y, xh @ wh.T, rtol=1e-5, atol=1e-5)                       # fprop
    torch.testing.assert_close(x.grad, ref_quantize(dy, 1, 128, pow2) @ wh, rtol=1e-5, atol=1e-5)   # dgrad
    x_cols = ref_quantize(xh, 128, 1, pow2)                  # the saved 1x128 FP8 activation, re-tiled 128x1
    torch.testing.assert_close(w.grad, ref_quantize(dy, 128, 1, pow2).T @ x_cols, rtol=1e-5, atol=1e-5)   # wgrad
    # and the whole thing is close to the high-precision linear
    assert fp8.calc_diff(y, x.detach() @ w.detach().T) < 2e-3


def test_fp8_matmul_batched_and_autocast_dtype():
    x = torch.randn(3, 40, 96, requires_grad=True)
    w = torch.randn(3, 50, 96, requires_grad=True)
    y = fp8.fp8_matmul(x, w)
    y.sum().backward()
    for e in range(3):
        xe, we = x[e].detach().requires_grad_(), w[e].detach().requires_grad_()
        ye = fp8.fp8_matmul(xe, we)
        ye.sum().backward()
        torch.testing.assert_close(y[e], ye)
        torch.testing.assert_close(x.grad[e], xe.grad)
        torch.testing.assert_close(w.grad[e], we.grad)
    # the CUDA kernels are 2-D: their batching helper, driven here by the emulation, equals the batched emulation
    xq, wq = fp8.quantize(x.detach(), fp8.ACT), fp8.quantize(w.detach()[0], fp8.WEIGHT)    # w broadcast
    torch.testing.assert_close(fp8._batched(fp8.emulated_matmul, xq, wq, torch.float32),
                               fp8.emulated_matmul(xq, wq, torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp8.fp8_linear(torch.randn(4, 96), torch.randn(8, 96)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="backend"):
        fp8.Recipe(backend="tensorcore")


def _fp8_model(seed=0):
    cfg = random_cfg(initializer_range=0.02)       # realistic scale (0.1 makes attention logits peaky)
    torch.manual_seed(seed)
    ref = randomize(Transformer(cfg).init_weights(seed), seed=seed, bias_std=0.0).train()
    model = randomize(Transformer(cfg).init_weights(seed), seed=seed, bias_std=0.0).train()
    return ref, model


def test_convert_keeps_names_and_high_precision_parts():
    ref, model = _fp8_model()
    names = list(model.state_dict())
    n = fp8.convert(model)
    assert n > 0 and any(isinstance(m, fp8.FP8Linear) for m in model.modules())
    assert fp8.convert(model) == 0                                            # idempotent
    assert list(model.state_dict()) == names
    for name, m in model.named_modules():
        kind = type(m).__name__
        if name.endswith(("gate", "eh_proj")) or name in ("embed", "head"):
            assert kind not in ("FP8Linear", "FP8Experts"), name
        if name.endswith((".wq_a", ".wkv_b", ".wo", ".w13", ".w2")) and "experts" not in name:
            assert kind == "FP8Linear", name
        if name.endswith(".experts"):
            assert kind == "FP8Experts", name


def test_converted_model_trains_close_to_high_precision():
    ref, model = _fp8_model()
    fp8.convert(model)
    ids = torch.randint(0, ref.cfg.vocab_size, (4, 24), generator=torch.Generator().manual_seed(3))
    outs = []
    for m in (ref, model):
        h = m.hidden(ids)
        loss = F.cross_entropy(m.logits(h).flatten(0, 1)[:-1], ids.flatten()[1:])
        loss.backward()
        outs.append((loss, h))
    assert abs(outs[0][0].item() - outs[1][0].item()) < 1e-2 * outs[0][0].item()
    assert fp8.calc_diff(outs[0][1], outs[1][1]) < 5e-3
    # every parameter gets a gradient and it points the same way as the high-precision one
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        assert fp8.calc_diff(p.grad, q.grad) < 0.05, name


def test_fp8_experts_equal_the_per_expert_fp8_reference():
    from nanoseek.model.moe import MoE
    cfg = random_cfg()
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.3)
    torch.nn.init.normal_(moe.experts.w13, std=0.1)
    torch.nn.init.normal_(moe.experts.w2, std=0.1)
    moe.shared = None
    x = torch.randn(40, cfg.hidden_size)
    weights, idx, _ = moe.gate(x)
    fp8_ex = fp8.FP8Experts.wrap(moe.experts, fp8.Recipe())
    got = fp8_ex(x, weights, idx, "padded")
    want = torch.zeros_like(x)
    for e in range(cfg.n_routed_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if len(rows):
            gate, up = fp8.fp8_linear(x[rows], moe.experts.w13[e]).chunk(2, dim=-1)
            want.index_add_(0, rows, fp8.fp8_linear(F.silu(gate) * up, moe.experts.w2[e]) * weights[rows, slot, None])
    # padding rows (zeros) never change a 1x128 tile's scale, so each token's tiles are the same
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pretrain_fp8_runs_and_tracks_high_precision(tmp_path):
    from nanoseek.train.pretrain import PretrainConfig, pretrain
    base = dict(preset="tiny", n_docs=2000, batch_size=8, seq_len=64, eval_every=0, plots=False,
                dtype="float32", max_steps=12, lr=3e-3, warmup=2, compile="off")
    a = pretrain(PretrainConfig(out=str(tmp_path / "hp"), **base))
    b = pretrain(PretrainConfig(out=str(tmp_path / "fp8"), fp8=True, adam_moments="bfloat16", save_fp8=True, **base))
    assert b["final_loss"] < 0.9 * b["first_loss"]
    assert abs(b["final_loss"] - a["final_loss"]) < 0.02 * a["final_loss"]
    cfg = json.loads((tmp_path / "fp8" / "final" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]


def test_fp8_checkpoint_loads_in_transformers_and_nanoseek_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open
    # 128-multiples except the MLA down-projections (kv_lora + rope = 136 rows, q_lora 160), which
    # must stay high precision: transformers misreads partial blocks
    cfg = random_cfg(hidden_size=256, moe_intermediate_size=128, intermediate_size=256, num_attention_heads=2,
                     qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=64, kv_lora_rank=120, q_lora_rank=160,
                     initializer_range=0.02)
    model = randomize(Transformer(cfg).init_weights(0)).eval()
    nanoseek.save_pretrained(model, tmp_path / "hp")
    nanoseek.save_pretrained(model, tmp_path / "fp8", fp8=True)
    with safe_open(str(tmp_path / "fp8" / "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
        s = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 1)
        assert f.get_tensor("model.layers.1.self_attn.kv_a_proj_with_mqa.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.self_attn.o_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))
    assert size(tmp_path / "fp8") < 0.5 * size(tmp_path / "hp")
    ours = nanoseek.from_pretrained(tmp_path / "fp8")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.float32).float().eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.logits(ours.hidden(ids))
        b = hf(ids).logits
        c = model.logits(model.hidden(ids))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert fp8.calc_diff(a, c) < 5e-3                                   # and close to the unquantized model (1.8e-3)


def test_bf16_adam_moments_match_adamw():
    from nanoseek.train.optim import AdamWLowPrecisionMoments, build_optimizer
    torch.manual_seed(0)
    p32, p16, pt = (torch.nn.Parameter(torch.randn(40, 30)) for _ in range(3))
    with torch.no_grad():
        p16.copy_(p32)
        pt.copy_(p32)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW([pt], **kw)
    same = AdamWLowPrecisionMoments([p32], dtype=torch.float32, **kw)
    low = AdamWLowPrecisionMoments([p16], **kw)
    for _ in range(10):
        g = torch.randn(40, 30)
        for p in (p32, p16, pt):
            p.grad = g.clone()
        ref.step(), same.step(), low.step()
    torch.testing.assert_close(p32, pt, rtol=1e-6, atol=1e-6)
    assert (p16 - pt).abs().max() < 1e-3 and low.state[p16]["exp_avg"].dtype == torch.bfloat16
    # resume: a reloaded optimizer keeps bf16 moments and continues exactly as the original
    q16 = torch.nn.Parameter(p16.detach().clone())
    again = AdamWLowPrecisionMoments([q16], **kw)
    again.load_state_dict(low.state_dict())
    assert again.state[q16]["exp_avg_sq"].dtype == torch.bfloat16
    g = torch.randn(40, 30)
    p16.grad, q16.grad = g.clone(), g.clone()
    low.step(), again.step()
    assert torch.equal(p16, q16)
    with pytest.raises(nanoseek.common.UserError, match="adam-moments"):
        build_optimizer(torch.nn.Linear(2, 2), 1e-3, moments="fp8")


def test_fused_adamw_matches_foreach():
    """The single-kernel AdamW (the default on CPU and CUDA) takes the same steps as the foreach one."""
    from nanoseek.train.optim import build_optimizer
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    b = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 4))
    b.load_state_dict(a.state_dict())
    oa, ob = build_optimizer(a, 1e-2, fused=False), build_optimizer(b, 1e-2)
    assert ob.defaults["fused"] and not oa.defaults.get("fused")          # CPU parameters: fused by default
    for _ in range(5):
        x = torch.randn(8, 16)
        for m, o in ((a, oa), (b, ob)):
            m(x).square().mean().backward()
            o.step()
            o.zero_grad()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_weight_only_fp8_inference_halves_weight_memory_and_tracks_bf16(tmp_path):
    from nanoseek.common import UserError
    from nanoseek.inference.llm import LLM
    from nanoseek.inference.sampling import SamplingParams
    cfg = random_cfg(initializer_range=0.02, hidden_size=128, moe_intermediate_size=64, intermediate_size=256,
                     vocab_size=64)
    prompts = [{"prompt_token_ids": [1, 5, 7, 9][: 2 + i % 3]} for i in range(6)]
    sp = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
    mem, outs, llms = {}, {}, {}
    for w in (None, "fp8"):
        model = Transformer(cfg).init_weights(0).eval().to(torch.bfloat16)
        llm = llms[w] = LLM(model, compile=False, weights=w)
        outs[w] = llm.generate(prompts, sp)
        mem[w] = fp8_weights.weight_bytes(model) + llm.engine.runner.weights.derived_bytes()
    assert mem["fp8"] < 0.6 * mem[None], mem          # e4m3 + scales; embedding, head, router, norms stay bf16
    fp8_model = llms["fp8"].model
    assert any(isinstance(m, fp8_weights.FP8WeightLinear) for m in fp8_model.modules())
    assert fp8_model.head.weight.dtype == torch.bfloat16 and type(fp8_model.layers[1].ffn.gate).__name__ == "Gate"
    # the decode step (folded, fused fp8 weights) follows the quantized model's own forward
    for a, b in zip(outs[None], outs["fp8"]):
        lp_a, lp_b = torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs)
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
        assert (lp_a[:1] - lp_b[:1]).abs().max() < 0.1          # measured 0.05 nats
    # the state dict still reads as ordinary weights: such a model saves and reloads
    nanoseek.save_pretrained(fp8_model, tmp_path / "m")
    back = nanoseek.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(back.layers[0].attn.wo.weight.bfloat16(), fp8_model.layers[0].attn.wo.weight)
    with pytest.raises(UserError, match="weights"):
        LLM(Transformer(cfg).init_weights(0), weights="int4")


def test_weight_only_fp8_runner_step_equals_the_quantized_model():
    from nanoseek.inference.engine import Engine
    cfg = random_cfg(initializer_range=0.02)
    model = Transformer(cfg).init_weights(0).eval()
    fp8_weights.quantize_weights(model)
    eng = Engine(model, compile=False, max_batch=4, autocast_dtype=torch.bfloat16)
    assert eng.runner.kinds == ["fp8"]
    ids = torch.tensor([[1, 4, 9, 16, 25]] * 4)
    eng.cache.begin(torch.zeros(4, dtype=torch.long), 4, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.hidden(ids[:, :4], eng.cache.positions, eng.cache)
        want = model.logits(model.hidden(ids, None)[:, -1]).float()
    logits = eng.runner.decode(ids[:, 4].tolist(), [4] * 4)[0]
    assert fp8.calc_diff(logits, want) < 2e-3, fp8.calc_diff(logits, want)


def test_enable_training_refuses_what_it_cannot_convert():
    from nanoseek.common import UserError
    with pytest.raises(UserError, match="nanoseek"):
        fp8.enable_training(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    with pytest.raises(UserError, match="fp8-scales"):
        fp8.enable_training(Transformer(random_cfg()), scales="e5m2")


def test_empty_inputs_and_speculative_decoding_with_fp8_weights():
    from nanoseek.inference.llm import LLM
    from nanoseek.inference.sampling import SamplingParams
    x = torch.zeros(0, 200, requires_grad=True)
    w = torch.randn(30, 200, requires_grad=True)
    y = fp8.fp8_linear(x, w)
    y.sum().backward()
    assert y.shape == (0, 30) and torch.equal(w.grad, torch.zeros_like(w))
    cfg = random_cfg(initializer_range=0.02)
    sp = SamplingParams(temperature=0, max_tokens=10)
    outs = [LLM(Transformer(cfg).init_weights(0).eval(), weights="fp8", speculative=spec, compile=False)
            .generate([{"prompt_token_ids": [1, 5, 7, 9]}], sp)[0].outputs[0].token_ids for spec in (False, True)]
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_fp8_training_compiles(tmp_path):
    """torch.compile sits on top of the FP8 modules (`pretrain --compile on`): same losses as eager.
    Slow: ~190 s of compilation on 2 CPU cores (measured 4.82647 eager vs 4.82657 compiled)."""
    from nanoseek.train.pretrain import PretrainConfig, pretrain
    base = dict(preset="tiny", n_docs=2000, batch_size=8, seq_len=64, eval_every=0, plots=False, dtype="float32",
                max_steps=4, lr=3e-3, warmup=2, fp8=True)
    a = pretrain(PretrainConfig(out=str(tmp_path / "eager"), compile="off", **base))
    b = pretrain(PretrainConfig(out=str(tmp_path / "compiled"), compile="on", **base))
    assert abs(a["final_loss"] - b["final_loss"]) < 1e-3 * a["final_loss"]


def run_gpu_fp8_dry(tmp_path, modes: str) -> dict:
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GPU_FP8_DRY": "1", "GPU_FP8_MODES": modes, "OUT": str(tmp_path), "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_fp8.py")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_fp8.json").read_text())
    for part in ("gemm", "quantize", "train_step"):
        assert "error" not in res[part], res[part]
    assert all(g["calc_diff_vs_bf16_unquantized"] < 2e-3 for g in res["gemm"])
    for mode in modes.split(","):
        assert res["train_step"][mode]["s_per_step"] > 0, res["train_step"][mode]
    return res


def test_gpu_fp8_script_runs_dry_on_cpu(tmp_path):
    """benchmarks/gpu_fp8.py is run once in a session with a GPU; its toy-size CPU mode keeps it working
    (the fused-quantizer training step compiles for ~75 s on 2 cores: the slow test below runs it)."""
    res = run_gpu_fp8_dry(tmp_path, "bf16,fp8")
    assert "fp8_fused" not in res["train_step"] and res["train_step"]["fp8_speedup_vs_bf16"] > 0


@pytest.mark.slow
def test_gpu_fp8_script_runs_dry_on_cpu_with_fused_quantizers(tmp_path):
    res = run_gpu_fp8_dry(tmp_path, "bf16,fp8,fp8_fused")
    assert res["train_step"]["fp8_fused_speedup_vs_bf16"] > 0


def test_gpu_fp8_script_rejects_unknown_modes(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_fp8.py")], capture_output=True, text=True,
                       env={**os.environ, "GPU_FP8_DRY": "1", "GPU_FP8_MODES": "bf16,fp9", "OUT": str(tmp_path),
                            "PYTHONPATH": str(root)}, timeout=120)
    assert r.returncode == 1 and "GPU_FP8_MODES=bf16,fp9" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("M,N,K", [(8192, 36864, 7168), (100, 300, 768), (64, 2048, 1000)])
@pytest.mark.parametrize("b_block", [fp8.WEIGHT, fp8.ACT])
def test_blockwise_scaled_mm_layout_passes_torch_checks(M, N, K, b_block):
    """The blockwise CUDA call's operand and scale layouts, checked by torch's own meta kernel of
    F.scaled_mm on meta tensors (no GPU needed). The first H200 run rejected the 128x128 weight scales
    laid out (N/128, K/128): torch wants (K/128 rounded up to 4, N/128), K-major."""
    from nanoseek.quant.fp8 import QTensor, _blockwise
    meta = dict(device="meta")
    a = QTensor(torch.empty(M, K, dtype=torch.float8_e4m3fn, **meta), torch.empty(M, -(-K // 128), **meta), fp8.ACT)
    rows = -(-N // 128) if b_block == fp8.WEIGHT else N
    b = QTensor(torch.empty(N, K, dtype=torch.float8_e4m3fn, **meta), torch.empty(rows, -(-K // 128), **meta), b_block)
    assert _blockwise(a, b, torch.bfloat16).shape == (M, N)


@pytest.mark.parametrize("lead_a,lead_b", [((4,), (4,)), ((3,), ())])
def test_blockwise_scaled_mm_layout_batched(lead_a, lead_b):
    """Expert-batched operands (and a weight broadcast over them): scales laid out once for all matrices,
    each matrix pair's slice passes torch's meta checks of F.scaled_mm."""
    from nanoseek.quant.fp8 import QTensor, _blockwise
    meta = dict(device="meta")
    M, N, K = 96, 300, 768
    a = QTensor(torch.empty(*lead_a, M, K, dtype=torch.float8_e4m3fn, **meta), torch.empty(*lead_a, M, K // 128, **meta),
                fp8.ACT)
    for b_block, rows in ((fp8.WEIGHT, -(-N // 128)), (fp8.ACT, N)):
        b = QTensor(torch.empty(*lead_b, N, K, dtype=torch.float8_e4m3fn, **meta),
                    torch.empty(*lead_b, rows, K // 128, **meta), b_block)
        assert _blockwise(a, b, torch.bfloat16).shape == (*lead_a, M, N)


def _check_fused(cases, pow2s):
    for pow2 in pow2s:
        for t, block in cases:
            want, got = fp8.quantize(t, block, pow2, fused=False), fp8.quantize(t, block, pow2, fused=True)
            assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8)) and torch.equal(got.scale, want.scale)
            assert got.q.is_contiguous()
        t = cases[0][0]
        want, got = fp8.quantize_transposed(t, pow2, fused=False), fp8.quantize_transposed(t, pow2, fused=True)
        assert got.q.is_contiguous() and torch.equal(got.scale, want.scale)
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
        saved = fp8.quantize(t, fp8.ACT, pow2)
        want, got = fp8.retile_transposed(saved, pow2, fused=False), fp8.retile_transposed(saved, pow2, fused=True)
        assert got.q.shape == t.mT.shape and torch.equal(got.scale, want.scale)
        assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))


def test_fused_quantizers_equal_reference():
    """The compiled one-pass quantizers (CUDA's default) give the reference's bits: 1x128 tiles and
    128x128 blocks with tails, the transposed tiles of wgrad's dy, and the wgrad re-tiling of a saved
    FP8 activation (= dequantize -> transpose -> quantize). CPU inductor here, the same code as on CUDA."""
    torch.manual_seed(0)
    x = torch.randn(2, 200, 300) * torch.logspace(-3, 3, 300)
    _check_fused([(x, fp8.ACT), (x[0], fp8.WEIGHT)], (False,))
    # other shapes of the same rank reuse the graph: one group, no tail, a single row, a single column
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    for shape in [(1, 128, 128), (3, 1, 384), (2, 5, 1), (1, 130, 200)]:
        _check_fused([(torch.randn(shape) * 100, fp8.ACT)], (False,))
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.slow
def test_fused_quantizers_equal_reference_all_cases():
    """As above over more layouts: batched weights, a transposed input, bf16, UE8M0 scales."""
    torch.manual_seed(0)
    x = torch.randn(2, 200, 300) * torch.logspace(-3, 3, 300)
    _check_fused([(x, fp8.ACT), (x[0], fp8.WEIGHT), (x, fp8.WEIGHT), (x[1].mT, fp8.ACT), (x[1].bfloat16(), fp8.ACT)],
                 (False, True))
