"""Decode throughput and cache size: nanoseek's engine vs HF transformers' generate, same weights, one run.

Model: the issue's 8.5M-param DeepseekV3 (hidden 256, 4 layers, 16 experts top-4, vocab 4096), random
weights, built by transformers and saved, then loaded by nanoseek from the same directory. Greedy,
prompt 32 tokens, 128 new tokens (no EOS on either side, so both generate exactly 128; HF with
min_new_tokens would instead suppress EOS and pick the runner-up token). Also prefill tokens/s,
and the KV-cache bytes per token each side actually allocates. `nanoseek_compiled` is the same engine
with `compile=True` (a static-shape torch.compile'd decode step); its compile time is excluded and
reported.

    .venv/bin/python benchmarks/bench_decode.py --batches 1 8 64
"""
import argparse
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--dtype", default="float32", help="nanoseek weights dtype (HF stays fp32)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    args = ap.parse_args()
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import nanoseek
    from nanoseek.inference import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = DeepseekV3Config(vocab_size=4096, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                           num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
                           n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                           q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                           max_position_embeddings=1024, tie_word_embeddings=False)
    hf = DeepseekV3ForCausalLM(cfg).eval()
    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    ours = nanoseek.from_pretrained(d, dtype=args.dtype)
    res = {"params": sum(p.numel() for p in hf.parameters()), "new_tokens": args.new, "prompt": args.prompt,
           "nanoseek_dtype": args.dtype, "decode_tok_s": {}, "prefill_tok_s": {}, "greedy_identical": {}}
    for B in args.batches:
        prompts = torch.randint(0, 4096, (B, args.prompt))
        llm = LLM(ours, max_batch=max(B, 1), max_len=args.prompt + args.new + 8)
        sp = SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True)
        reqs = [{"prompt_token_ids": p.tolist()} for p in prompts]
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        llm.generate(reqs[:B], warm)
        fast = None if args.no_compile else LLM(ours, max_batch=max(B, 1), max_len=args.prompt + args.new + 8,
                                                 compile=True)
        if fast is not None:
            t = time.perf_counter()
            fast.generate(reqs[:B], warm)                                      # compiles this batch's bucket
            res.setdefault("compile_s", {})[B] = round(time.perf_counter() - t, 1)
        with torch.no_grad():
            hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=4, do_sample=False,
                        eos_token_id=None)
        best = {"hf": float("inf"), "nanoseek": float("inf")}
        if fast is not None:
            best["nanoseek_compiled"] = float("inf")
        for _ in range(args.repeat):
            with torch.no_grad():
                t = time.perf_counter()
                g = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new,
                                eos_token_id=None, do_sample=False, return_dict_in_generate=True)
                best["hf"] = min(best["hf"], time.perf_counter() - t)
            t = time.perf_counter()
            outs = llm.generate(reqs, sp)
            best["nanoseek"] = min(best["nanoseek"], time.perf_counter() - t)
            if fast is not None:
                t = time.perf_counter()
                fouts = fast.generate(reqs, sp)
                best["nanoseek_compiled"] = min(best["nanoseek_compiled"], time.perf_counter() - t)
        ref = [g.sequences[i, args.prompt:].tolist() for i in range(B)]
        res["greedy_identical"][B] = f"{sum(o.outputs[0].token_ids == r for o, r in zip(outs, ref))}/{B}"
        if fast is not None:
            res.setdefault("compiled_identical_to_eager", {})[B] = all(
                a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs, fouts))
        res["decode_tok_s"][B] = {k: round(B * args.new / v, 1) for k, v in best.items()}
        res["decode_tok_s"][B]["speedup"] = round(best["hf"] / best["nanoseek"], 2)
        if fast is not None:
            res["decode_tok_s"][B]["speedup_compiled"] = round(best["hf"] / best["nanoseek_compiled"], 2)
        if B == args.batches[-1]:
            n_tok = B * (args.prompt + args.new)
            res["hf_cache_bytes_per_token"] = round(hf_cache_bytes(g.past_key_values) / n_tok, 1)
            res["nanoseek_cache_bytes_per_token"] = llm.engine.cache.bytes_per_token()
            res["latent_formula_bytes_per_token"] = (64 + 16) * 4 * ours.embed.weight.element_size()
        # prefill: one forward over B prompts
        with torch.no_grad():
            t = time.perf_counter()
            hf(prompts)
            hf_pf = time.perf_counter() - t
        eng = llm.engine
        for r in reqs:
            eng.add_request(r["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=1))
        t = time.perf_counter()
        eng.step()
        our_pf = time.perf_counter() - t
        while eng.has_work():
            eng.step()
        res["prefill_tok_s"][B] = {"hf": round(B * args.prompt / hf_pf, 1), "nanoseek": round(B * args.prompt / our_pf, 1)}
    report("bench_decode", res)


if __name__ == "__main__":
    main()
