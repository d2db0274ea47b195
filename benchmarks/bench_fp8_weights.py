"""Weight-only FP8 inference vs bf16: weight memory, logit difference, greedy agreement, decode speed.

The same weights loaded twice, `LLM(dir, dtype="bfloat16")` and `LLM(dir, dtype="bfloat16",
weights="fp8")` (block linears and experts as e4m3 + 128x128 block scales, dequantized per GEMM), both
decoding eagerly (the fp8 step cannot be compiled yet, see runner/__init__.py) so that speed compares
like with like. Memory counts the model's tensors plus the runner's derived decode weights. Also
writes the model as an FP8 checkpoint and reports its size on disk against bf16.

    .venv/bin/python benchmarks/bench_fp8_weights.py --name bench_fp8_weights_random8m   # 8.5M bench model, random weights
    .venv/bin/python benchmarks/bench_fp8_weights.py --model runs/r1-zero/rl/final      # the main job's RL model
"""
import argparse
import tempfile
import time
from pathlib import Path

import torch
from results_io import report


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model directory (default: the benchmark model, random weights)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--name", default="bench_fp8_weights", help="results/NAME.json")
    args = ap.parse_args()
    import nanoseek
    from bench_fp8 import cpu_name
    from nanoseek.inference.llm import LLM
    from nanoseek.inference.sampling import SamplingParams
    from nanoseek.quant.fp8 import calc_diff
    from nanoseek.quant.fp8_weights import weight_bytes

    tmp = tempfile.TemporaryDirectory()
    src = Path(args.model) if args.model else None
    if src is None:
        from bench_model import hf_config
        from nanoseek.config import ModelConfig
        from nanoseek.model import Transformer
        cfg = ModelConfig.from_hf_dict(hf_config().to_dict())
        src = Path(tmp.name) / "bench"
        nanoseek.save_pretrained(Transformer(cfg).init_weights(0), src)
    fp8_dir = Path(tmp.name) / "fp8"
    nanoseek.save_pretrained(nanoseek.from_pretrained(src), fp8_dir, fp8=True)
    bf16_dir = Path(tmp.name) / "bf16"
    nanoseek.save_pretrained(nanoseek.from_pretrained(src), bf16_dir, dtype=torch.bfloat16)

    g = torch.Generator().manual_seed(0)
    V = nanoseek.from_pretrained(src).cfg.vocab_size
    prompts = [{"prompt_token_ids": [1] + torch.randint(3, V, (31,), generator=g).tolist()} for _ in range(args.batch)]
    sp = SamplingParams(temperature=0, max_tokens=args.new, logprobs=0, ignore_eos=True)
    res = {"host": cpu_name(), "model": str(args.model or "benchmark model (8.5M, random weights)"),
           "batch": args.batch, "new_tokens": args.new,
           "checkpoint_mb": {"bf16": round(dir_bytes(bf16_dir) / 2**20, 2), "fp8": round(dir_bytes(fp8_dir) / 2**20, 2)}}
    outs, logits = {}, {}
    for name, kw in (("bf16", {}), ("fp8", {"weights": "fp8"})):
        llm = LLM(str(src), dtype="bfloat16", compile=False, **kw)
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4))          # warm-up
        t = time.perf_counter()
        outs[name] = llm.generate(prompts, sp)
        dt = time.perf_counter() - t
        eng = llm.engine
        ids = torch.tensor([p["prompt_token_ids"] for p in prompts])
        with torch.no_grad(), eng._autocast():
            logits[name] = llm.model.logits(llm.model.hidden(ids)).float()
        res[name] = {"weight_mb": round((weight_bytes(llm.model) + eng.runner.weights.derived_bytes()) / 2**20, 3),
                     "model_tensors_mb": round(weight_bytes(llm.model) / 2**20, 3),
                     "decode_tokens_per_s": round(args.batch * args.new / dt, 1)}
    res["memory_ratio_fp8_over_bf16"] = round(res["fp8"]["weight_mb"] / res["bf16"]["weight_mb"], 3)
    res["speed_ratio_fp8_over_bf16"] = round(res["fp8"]["decode_tokens_per_s"] / res["bf16"]["decode_tokens_per_s"], 3)
    res["prompt_logits"] = {"calc_diff": calc_diff(logits["fp8"], logits["bf16"]),
                            "max_abs_diff": round(float((logits["fp8"] - logits["bf16"]).abs().max()), 4),
                            "max_abs_logit": round(float(logits["bf16"].abs().max()), 3),
                            "top1_agreement": round(float((logits["fp8"].argmax(-1) == logits["bf16"].argmax(-1)).float().mean()), 4)}
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs["bf16"], outs["fp8"])]
    first = [next((i for i, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)) if x != y), args.new)
             for a, b in zip(outs["bf16"], outs["fp8"])]
    res["greedy"] = {"identical_sequences": f"{sum(same)}/{len(same)}", "mean_tokens_before_first_difference": sum(first) / len(first)}
    report(args.name, res)


if __name__ == "__main__":
    main()
