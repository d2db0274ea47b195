"""Decode throughput and cache size: nanoseek's engine vs HF transformers' generate (and llama.cpp when
given), same weights, one run.

Model: the issue's 8.5M-param DeepseekV3 (hidden 256, 4 layers, 16 experts top-4, vocab 4096), random
weights, built by transformers and saved, then loaded by each contender from the same directory.
Greedy, prompt 32 tokens, 128 new tokens (no EOS on either side, so both generate exactly 128). Each
figure is generated tokens / wall time of the whole call, prefill included (as `generate` measures).

Contenders, interleaved, best of --repeat each:
  hf_fp32, hf_bf16      `generate` in fp32 and in bf16; the peer is the faster of the two on this host
  nanoseek              the default `LLM(model_dir)`: precision and kernels measured on this host, the
                        decode step compiled up front for this batch size as `nanoseek serve` does
                        (compile time excluded, reported)
  nanoseek_fp32         `LLM(model_dir, autocast_dtype="float32")`, compiled: greedy tokens == HF fp32
  nanoseek_eager        the default precision without compiling
  llama.cpp f32 / bf16  `llama-batched-bench` on the same weights converted to GGUF (--llama-cpp DIR,
                        see llama_cpp_bench.py); run after the others, in its own process

    .venv/bin/python benchmarks/bench_decode.py --batches 1 8 64 --repeat 3 [--llama-cpp DIR]
"""
import argparse
import platform
import subprocess
import tempfile
import time

import torch
from results_io import report


def hf_cache_bytes(past) -> int:
    total = 0
    for layer in getattr(past, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp checkout with a llama-batched-bench build "
                    "(default: $LLAMA_CPP_DIR; none: skip)")
    args = ap.parse_args()
    from nanoseek.common import tune_cpu_allocator
    # what `nanoseek serve/generate` do at start-up; HF shares this process and so this allocator
    allocator = "tuned" if tune_cpu_allocator() else "system"
    import llama_cpp_bench as llama_cpp
    from bench_model import hf_config
    from transformers import DeepseekV3ForCausalLM
    from transformers import __version__ as hf_version

    from nanoseek.inference import LLM, SamplingParams

    llama_root = llama_cpp.find(args.llama_cpp)
    torch.manual_seed(0)
    cfg = hf_config()
    hf = {"hf_fp32": DeepseekV3ForCausalLM(cfg).eval()}
    d = tempfile.mkdtemp()
    hf["hf_fp32"].save_pretrained(d)
    hf["hf_bf16"] = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    res = {"host": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "allocator": allocator,
           "transformers": hf_version, "params": sum(p.numel() for p in hf["hf_fp32"].parameters()),
           "new_tokens": args.new, "prompt": args.prompt, "decode_tok_s": {}, "prefill_tok_s": {},
           "greedy_identical_fp32_vs_hf_fp32": {}, "compile_s": {}, "plan": {}}
    max_len = args.prompt + args.new + 8
    for B in args.batches:
        prompts = torch.randint(0, 4096, (B, args.prompt))
        reqs = [{"prompt_token_ids": p.tolist()} for p in prompts]
        sp = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
        ours = {"nanoseek": LLM(d, max_batch=B, max_len=max_len),
                "nanoseek_fp32": LLM(d, max_batch=B, max_len=max_len, autocast_dtype="float32"),
                "nanoseek_eager": LLM(d, max_batch=B, max_len=max_len, compile=False)}
        res["compile_s"][B] = {}
        for name, llm in ours.items():
            t = time.perf_counter()
            llm.engine.runner.warmup([llm.engine.runner.bucket(B)])           # what `serve` does at start-up
            if name != "nanoseek_eager":
                res["compile_s"][B][name] = round(time.perf_counter() - t, 1)
            llm.generate(reqs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        runner = ours["nanoseek"].engine.runner
        plan = runner.plan(runner.bucket(B))
        kernels = [v for n, v in plan.items() if isinstance(v, str) and not n.endswith(".path")]
        res["plan"][B] = {k: kernels.count(k) for k in sorted(set(kernels))}
        for m in hf.values():
            with torch.no_grad():
                m.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=4, do_sample=False,
                           eos_token_id=None)
        best = {k: float("inf") for k in list(hf) + list(ours)}
        outs = {}
        for _ in range(args.repeat):
            for name, m in hf.items():
                with torch.no_grad():
                    t = time.perf_counter()
                    g = m.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                                   eos_token_id=None, do_sample=False, return_dict_in_generate=True)
                    best[name] = min(best[name], time.perf_counter() - t)
                outs[name] = g
            for name, llm in ours.items():
                t = time.perf_counter()
                outs[name] = llm.generate(reqs, sp)
                best[name] = min(best[name], time.perf_counter() - t)
        ref = [outs["hf_fp32"].sequences[i, args.prompt:].tolist() for i in range(B)]
        same = sum(o.outputs[0].token_ids == r for o, r in zip(outs["nanoseek_fp32"], ref))
        res["greedy_identical_fp32_vs_hf_fp32"][B] = f"{same}/{B}"
        tok_s = {k: round(B * args.new / v, 1) for k, v in best.items()}
        peer = max(tok_s["hf_fp32"], tok_s["hf_bf16"])
        tok_s["speedup"] = round(tok_s["nanoseek"] / peer, 2)
        tok_s["speedup_fp32"] = round(tok_s["nanoseek_fp32"] / peer, 2)
        tok_s["speedup_eager"] = round(tok_s["nanoseek_eager"] / peer, 2)
        res["decode_tok_s"][B] = tok_s
        # the compiled engines' MoE capacities as fitted to the router's loads, and their eager reruns
        res.setdefault("moe_steps", {})[B] = {
            k: {s: ours[k].engine.runner.stats[s] for s in ("capacity", "overflow_reruns", "compiled_steps")}
            for k in ("nanoseek", "nanoseek_fp32")}
        if B == args.batches[-1]:
            n_tok = B * (args.prompt + args.new)
            res["hf_cache_bytes_per_token"] = round(hf_cache_bytes(outs["hf_fp32"].past_key_values) / n_tok, 1)
            res["nanoseek_cache_bytes_per_token"] = ours["nanoseek"].engine.cache.bytes_per_token()
            res["latent_formula_bytes_per_token"] = (64 + 16) * 4 * 4
        # prefill: one forward over B prompts
        pf = {}
        for name, m in hf.items():
            with torch.no_grad():
                t = time.perf_counter()
                m(prompts)
                pf[name] = B * args.prompt / (time.perf_counter() - t)
        eng = ours["nanoseek"].engine
        for r in reqs:
            eng.add_request(r["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        eng.step()
        pf["nanoseek"] = B * args.prompt / (time.perf_counter() - t)
        while eng.has_work():
            eng.step()
        res["prefill_tok_s"][B] = {k: round(v, 1) for k, v in pf.items()}
        del ours
    if llama_root is not None:
        lc = llama_cpp.run(llama_root, d, 4096, args.batches, args.prompt, args.new, threads=torch.get_num_threads())
        res["llama_cpp"] = lc
        for B in args.batches:
            best_lc = max(lc[dt][B]["gen_tok_s"] for dt in lc)
            res["decode_tok_s"][B]["llama_cpp_best"] = best_lc
            res["decode_tok_s"][B]["vs_llama_cpp"] = round(res["decode_tok_s"][B]["nanoseek"] / best_lc, 2)
    report("bench_decode" if allocator == "tuned" else "bench_decode_system_malloc", res)


if __name__ == "__main__":
    main()
