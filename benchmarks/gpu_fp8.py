"""One short GPU run for FP8 (nanoseek/quant/fp8.py): GEMM TFLOP/s on V3 shapes and a training step.

    PYTHONPATH=. python3 benchmarks/gpu_fp8.py          # writes $OUT/gpu_fp8.json (or ./gpu_fp8.json)
    GPU_FP8_DRY=1 .venv/bin/python benchmarks/gpu_fp8.py   # the same code on CPU at toy sizes (checks the script)

1. GEMMs y = x W^T for DeepSeek-V3's shapes (8192 tokens): bf16 `torch.mm` vs the blockwise FP8 kernel
   `fp8.matmul` picks (1x128 activation tiles x 128x128 weight blocks, operands quantized beforehand),
   its backend (which CUDA kernel passed the first-use check against the emulation), and calc_diff of
   its output against the bf16 product of the unquantized inputs;
2. the cost of quantizing (1x128 tiles) a 8192 x 7168 bf16 activation, in GB/s: the reference (eager,
   several passes) and the fused quantizer (one compiled kernel, CUDA's default);
3. a training step of a V3-shaped model (hidden 2048, 4 layers, 32 experts top-4) in bf16 autocast,
   without and with `--fp8` (enable_training), and with FP8's opt-in fused quantizers, B4 x T2048;
   bf16_compiled / fp8_compiled: the same with every block compiled (`--compile on`), B4 x T2048:
   seconds per step, the first step's time (the fused quantizers compile there), compiled graphs,
   first-step losses, and each FP8 step's top GPU kernels.
Each part reports its error instead of stopping the run; a part that would start after
GPU_FP8_BUDGET_S seconds (default 300) is skipped and says so. GPU_FP8_MODES picks the training step's modes
(default bf16,fp8,fp8_fused; the dry run's fp8_fused compiles its quantizers in ~1 minute on 2 CPU cores:
74 s for its slow test on an AVX2 EPYC, 2026-11-28).
"""
import json
import os
import time
import traceback
import warnings
from pathlib import Path

import torch

OUT = os.environ.get("OUT", ".")
os.makedirs(OUT, exist_ok=True)
res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none", "torch": torch.__version__}
T0 = time.time()
BUDGET_S = float(os.environ.get("GPU_FP8_BUDGET_S", 300))


def part(name):
    def wrap(fn):
        t = time.time()
        if t - T0 > BUDGET_S:
            res[name] = {"skipped": f"time budget of {BUDGET_S:.0f} s spent"}
            return
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                res[name] = fn()
            res.setdefault("warnings", []).extend(str(w.message)[:300] for w in caught)
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        res.setdefault("seconds", {})[name] = round(time.time() - t, 1)
        json.dump(res, open(os.path.join(OUT, "gpu_fp8.json"), "w"), indent=2)
    return wrap


DRY = os.environ.get("GPU_FP8_DRY") == "1"
dev = "cpu" if DRY else "cuda"
S = 64 if DRY else 1                      # dry run: every size divided by S
ALL_MODES = ("bf16", "fp8", "fp8_fused", "bf16_compiled", "fp8_compiled")
MODES = os.environ.get("GPU_FP8_MODES", "bf16,fp8,fp8_fused").split(",")
if set(MODES) - set(ALL_MODES):
    raise SystemExit(f"GPU_FP8_MODES={','.join(MODES)}: choose from {', '.join(ALL_MODES)} (comma-separated)")


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps=20):
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps if not DRY else 1):
        fn()
    sync()
    return (time.perf_counter() - t) / (reps if not DRY else 1)


from nanoseek.quant import fp8  # noqa: E402
from profiles import top_kernels  # noqa: E402  (benchmarks/ is the script's directory)


@part("gemm")
def _():
    out = []
    M = 8192 // S
    for name, N, K in (("attn q_b", 24576, 1536), ("attn o", 7168, 16384), ("dense up+gate", 36864, 7168),
                       ("expert up+gate", 4096, 7168), ("expert down", 7168, 2048)):
        N, K = N // S, K // S
        x = torch.randn(M, K, device=dev)
        w = 0.02 * torch.randn(N, K, device=dev)
        xb, wb = x.bfloat16(), w.bfloat16()
        t_bf16 = timed(lambda: xb @ wb.T)
        xq, wq = fp8.quantize(x, fp8.ACT), fp8.quantize(w, fp8.WEIGHT)
        fp8._CUDA_OK.clear()
        y = fp8.matmul(xq, wq, torch.bfloat16)
        backend = {k[1]: v for k, v in fp8._CUDA_OK.items()}
        t_fp8 = timed(lambda: fp8.matmul(xq, wq, torch.bfloat16))
        flop = 2 * M * N * K
        out.append({"gemm": name, "MNK": [M, N, K], "bf16_tflops": round(flop / t_bf16 / 1e12, 1),
                    "fp8_tflops": round(flop / t_fp8 / 1e12, 1), "speedup": round(t_bf16 / t_fp8, 2),
                    "backend_checks": backend, "calc_diff_vs_bf16_unquantized": fp8.calc_diff(y.float(), (xb @ wb.T).float())})
    return out


@part("quantize")
def _():
    x = torch.randn(8192 // S, 7168 // S, device=dev, dtype=torch.bfloat16)
    out = {}
    # (the dry run compiles the fused quantizer only when its training mode is asked for: ~10 s on 2 cores)
    for name, fused in (("reference", False), ("fused", True))[: 1 if DRY and "fp8_fused" not in MODES else 2]:
        t = timed(lambda: fp8.quantize(x, fp8.ACT, fused=fused))
        out[name] = {"ms": round(t * 1e3, 3), "GB_per_s": round((x.numel() * 2 + x.numel()) / t / 1e9, 1)}
    return out


def host_profile(fn, n=20):
    """Where one call of fn spends host time: the top Python functions by cumulative time (cProfile).
    (The fused FP8 step ran 1.5-4.2 s on an H200 with ~0.1 s of kernels in it.)"""
    import cProfile
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    fn()
    sync()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][3])[:n]
    return [{"fn": f"{Path(k[0]).name}:{k[1]}({k[2]})"[:90], "calls": v[1], "cum_s": round(v[3], 3),
             "self_s": round(v[2], 3)} for k, v in rows]


@part("train_step")
def _():
    from nanoseek.config import ModelConfig
    from nanoseek.model import Transformer
    from nanoseek.train.optim import build_optimizer
    import torch.nn.functional as F

    d = 16 if DRY else 1
    cfg = ModelConfig(vocab_size=32000 // d, hidden_size=2048 // d, intermediate_size=5632 // d,
                      moe_intermediate_size=1024 // d, num_hidden_layers=4, first_k_dense_replace=1,
                      num_attention_heads=16 // d * 2 if DRY else 16, q_lora_rank=768 // d, kv_lora_rank=512 // d,
                      qk_nope_head_dim=128 // d, qk_rope_head_dim=64 // d, v_head_dim=128 // d,
                      n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                      max_position_embeddings=4096, num_nextn_predict_layers=0)
    T = 2048 // d
    ids = torch.randint(0, cfg.vocab_size, (4, T + 1), device=dev)
    out = {}
    for mode in MODES:
        if time.time() - T0 > BUDGET_S + 60:
            out[mode] = {"skipped": "out of time"}
            continue
        torch.manual_seed(0)
        model = Transformer(cfg).init_weights(0).to(dev).train()
        if mode in ("fp8", "fp8_compiled"):
            fp8.enable_training(model)
        elif mode == "fp8_fused":
            fp8.convert(model, fp8.Recipe(fused=True))
            torch._logging.set_logs(recompiles=True)      # to fp8.log: why a graph recompiled, if one does
        if mode.endswith("_compiled"):                # the trainer's --compile on: every block compiled
            from nanoseek.train.compiled import StepCompiler   # (the FP8 linear inside, as an autograd function)
            StepCompiler(model, "on")
        opt = build_optimizer(model, 1e-4)
        losses = []

        def step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = F.cross_entropy(model.logits(model.hidden(ids[:, :-1])).float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        step()
        sync()
        first = time.perf_counter() - t0
        from torch._dynamo.utils import counters
        t = timed(step, reps=5)               # (its own warm-up step first: a second compile, if any, lands there)
        out[mode] = {"s_per_step": round(t, 4), "tokens_per_s": round(4 * T / t), "first_step_s": round(first, 1),
                     "compiled_graphs": counters["stats"].get("unique_graphs", 0),
                     "first_loss": losses[0],
                     "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if dev == "cuda" else None}
        if mode.startswith("fp8"):
            out[f"{mode}_top_kernels"] = top_kernels(step, dev == "cuda", n=15, name_chars=80)
            out[f"{mode}_host_top"] = host_profile(step)
        res["train_step"] = out              # kept if a later mode runs past the session's time
        json.dump(res, open(os.path.join(OUT, "gpu_fp8.json"), "w"), indent=2)
        model = opt = None     # free before the next mode
        if dev == "cuda":
            torch.cuda.empty_cache()
    for mode, base in (("fp8", "bf16"), ("fp8_fused", "bf16"), ("fp8_compiled", "bf16_compiled"),
                       ("fp8_compiled", "bf16")):
        if "s_per_step" in out.get(mode, {}) and "s_per_step" in out.get(base, {}):
            out[f"{mode}_speedup_vs_{base}"] = round(out[base]["s_per_step"] / out[mode]["s_per_step"], 3)
    return out


print(json.dumps(res, indent=2))
