"""One short GPU run for the pieces this tree changed: the decode runner and training on CUDA.

    PYTHONPATH=. python3 benchmarks/gpu_check.py          # writes $OUT/gpu_check.json (or ./gpu_check.json)

1. greedy tokens of `LLM(..., autocast_dtype="float32")` on CUDA == HF `generate` fp32 (8 prompts);
2. decode tok/s, the 8.5M bench model, 128 new tokens: nanoseek default (bf16) vs HF bf16, batch 1/8/64;
3. pretraining `small` on CUDA, bf16: eager step vs blocks compiled by `train/compiled.py`.
Each part is time-boxed and reports its error instead of stopping the run.
"""
import json
import os
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))       # bench_model.py beside it
OUT = os.environ.get("OUT", ".")
res = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
       "torch": torch.__version__}
T0 = time.time()


def part(name):
    def wrap(fn):
        t = time.time()
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        res.setdefault("seconds", {})[name] = round(time.time() - t, 1)
        json.dump(res, open(os.path.join(OUT, "gpu_check.json"), "w"), indent=2)
    return wrap


from bench_model import hf_config  # noqa: E402
from transformers import DeepseekV3ForCausalLM  # noqa: E402

from nanoseek.inference import LLM, SamplingParams  # noqa: E402

torch.manual_seed(0)
cfg = hf_config()
D = tempfile.mkdtemp()
DeepseekV3ForCausalLM(cfg).save_pretrained(D)


@part("greedy_fp32_vs_hf")
def _():
    hf = DeepseekV3ForCausalLM.from_pretrained(D).cuda().eval()
    llm = LLM(D, device="cuda", autocast_dtype="float32", max_batch=8, max_len=96)
    p = torch.randint(0, 4096, (8, 16))
    ref = hf.generate(p.cuda(), attention_mask=torch.ones_like(p).cuda(), max_new_tokens=32, do_sample=False,
                      eos_token_id=None)[:, 16:].tolist()
    outs = llm.generate([{"prompt_token_ids": r.tolist()} for r in p],
                        SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    return {"identical": sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref)), "of": 8,
            "runner_eager_steps": llm.engine.runner.stats["eager_steps"]}


@part("decode_tok_s")
def _():
    out = {}
    hf = DeepseekV3ForCausalLM.from_pretrained(D, dtype=torch.bfloat16).cuda().eval()
    for B in (1, 8, 64):
        llm = LLM(D, device="cuda", max_batch=B, max_len=176)
        p = torch.randint(0, 4096, (B, 32))
        reqs = [{"prompt_token_ids": r.tolist()} for r in p]
        sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
        llm.generate(reqs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        hf.generate(p.cuda(), attention_mask=torch.ones_like(p).cuda(), max_new_tokens=4, do_sample=False,
                    eos_token_id=None)
        best = {"nanoseek": 1e9, "hf_bf16": 1e9}
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(reqs, sp)
            torch.cuda.synchronize()
            best["nanoseek"] = min(best["nanoseek"], time.perf_counter() - t)
            t = time.perf_counter()
            with torch.no_grad():
                hf.generate(p.cuda(), attention_mask=torch.ones_like(p).cuda(), max_new_tokens=128,
                            do_sample=False, eos_token_id=None)
            torch.cuda.synchronize()
            best["hf_bf16"] = min(best["hf_bf16"], time.perf_counter() - t)
        out[B] = {k: round(B * 128 / v, 1) for k, v in best.items()}
        out[B]["ratio"] = round(out[B]["nanoseek"] / out[B]["hf_bf16"], 2)
        if time.time() - T0 > 300:
            break
    return out


@part("train_small_cuda")
def _():
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.train.compiled import StepCompiler
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.losses import forward_losses
    from nanoseek.train.pretrain import PretrainConfig

    c = load_preset("small")
    batch = torch.randint(0, c.vocab_size, (8, 257), device="cuda")
    pc = PretrainConfig(mtp_lambda=0.3)
    out = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        m = Transformer(c).init_weights(0).cuda().train()
        opt = build_optimizer(m, 1e-4)
        if mode == "compiled":
            StepCompiler(m, "on")
        losses, times = [], []
        for i in range(8):
            torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward_losses(m, batch, pc)["total"]
            loss.backward()
            opt.step()
            opt.zero_grad()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
            losses.append(round(loss.item(), 4))
        out[mode] = {"first_step_s": round(times[0], 2), "step_s": round(min(times[2:]), 4), "losses": losses}
    return out


print(json.dumps(res, indent=2)[:6000])
