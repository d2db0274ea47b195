"""MTP speculative decoding and the FP8 latent cache, on a trained model (default: the main job's RL model).

Speculative: greedy, identical tokens to plain decoding is checked, acceptance rate of the MTP draft and
tokens/s vs plain decoding at batch 1 and 16, both with their decode steps compiled up front (as `serve`
does). In mixed precision (the default where bf16 GEMMs pay) the verify step's two rows per sequence
may take other kernels than plain decoding's one, so tokens can differ; --dtype float32 makes them equal. FP8 cache: e4m3 + one fp32 scale per token per layer;
bytes per cached token from the allocated tensors, token agreement with the fp32 cache and the largest
difference of the generated tokens' log-probs.

    .venv/bin/python benchmarks/bench_spec_fp8.py --model runs/r1-zero/rl/final
"""
import argparse
import time

from results_io import report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/r1-zero/rl/final")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="compute dtype (default: measured per host; float32 for "
                    "bit-identical speculative vs plain tokens)")
    args = ap.parse_args()
    import nanoseek
    from nanoseek.data.tasks import get_task
    from nanoseek.inference import LLM, SamplingParams
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.rollout import prompt_ids

    tok = Tokenizer.load(args.model)
    model = nanoseek.from_pretrained(args.model)
    probs = get_task("arithmetic", min_digits=3, max_digits=3).problems(args.n, seed=7, split="test")
    prompts = [{"prompt_token_ids": prompt_ids(tok, p.question)} for p in probs]
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens, logprobs=0)
    res = {"model": args.model, "speculative": {}, "fp8_cache": {}}
    from bench_decode import cpu_model
    res["host"] = cpu_model()
    for B in (1, 16):
        plain = LLM(model, tokenizer=tok, max_batch=B, max_len=256, autocast_dtype=args.dtype)
        spec = LLM(model, tokenizer=tok, max_batch=B, max_len=256, speculative=True, autocast_dtype=args.dtype)
        plain.engine.runner.warmup([plain.engine.runner.bucket(B)])           # both compiled up front,
        spec.engine.runner.warmup([spec.engine.runner.bucket(B)])                       # as `serve` does
        spec.engine.runner.warmup([1, 2], spec=True)
        plain.generate(prompts[:B], sp)
        spec.generate(prompts[:B], sp)
        spec.engine.stats.update(spec_drafts=0, spec_accepted=0)
        t_plain = t_spec = float("inf")
        for _ in range(args.repeat):             # alternate, keep the best: the host's speed drifts
            spec.engine.stats.update(spec_drafts=0, spec_accepted=0)
            t = time.perf_counter()
            a = plain.generate(prompts, sp)
            t_plain = min(t_plain, time.perf_counter() - t)
            t = time.perf_counter()
            b = spec.generate(prompts, sp)
            t_spec = min(t_spec, time.perf_counter() - t)
        n_tok = sum(len(o.outputs[0].token_ids) for o in a)
        st = spec.engine.stats
        res["speculative"][B] = {
            "identical_tokens": all(x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(a, b)),
            "acceptance_rate": round(st["spec_accepted"] / max(1, st["spec_drafts"]), 3),
            "plain_tok_s": round(n_tok / t_plain, 1), "speculative_tok_s": round(n_tok / t_spec, 1),
            "speedup": round(t_plain / t_spec, 2)}
    full = LLM(model, tokenizer=tok, max_batch=16, max_len=256).generate(prompts, sp)
    fp8_llm = LLM(model, tokenizer=tok, max_batch=16, max_len=256, kv_cache_dtype="fp8")
    fp8 = fp8_llm.generate(prompts, sp)
    same = [x.outputs[0].token_ids == y.outputs[0].token_ids for x, y in zip(full, fp8)]
    diffs = [abs(p - q) for x, y in zip(full, fp8) if x.outputs[0].token_ids == y.outputs[0].token_ids
             for p, q in zip(x.outputs[0].logprobs, y.outputs[0].logprobs)]
    ref_cache = LLM(model, tokenizer=tok, max_batch=16, max_len=256).engine.cache
    res["fp8_cache"] = {"identical_sequences": f"{sum(same)}/{len(same)}",
                        "max_abs_logprob_diff": round(max(diffs), 5) if diffs else None,
                        "bytes_per_token_fp8": fp8_llm.engine.cache.bytes_per_token(),
                        "bytes_per_token_fp32": ref_cache.bytes_per_token(),
                        "bytes_per_token_bf16_equivalent": ref_cache.bytes_per_token() / 2}
    report("bench_spec_fp8", res)


if __name__ == "__main__":
    main()
