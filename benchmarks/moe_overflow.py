"""How often the decode runner's capacity MoE path overflows, per capacity factor, on real decode steps.

    .venv/bin/python benchmarks/moe_overflow.py [--model mid|bench] [--batch 64] [--new 48]

Decodes `--batch` random 32-token prompts greedily on CPU (eager runner, bf16 weights) and records,
at every MoE layer of every batch-wide step, the busiest expert's number of (token, expert) pairs.
An overflow at factor f is a layer-step where that exceeds `capacity` = f x the mean load rounded up
to 8 (runner/moe.py). `mid` is bench_gpu.py's 1.71B model (32 experts top-4; the H200 run overflowed
at 2x in 152 of 381 batch-64 steps), `bench` the 8.5M decode-benchmark model (16 experts top-4).
Writes benchmarks/results/moe_overflow_<model>.json.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mid", choices=["mid", "bench"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=48)
    args = ap.parse_args()
    from bench_decode import cpu_model
    from bench_gpu import MID
    from bench_model import hf_config

    import nanoseek.inference.runner.moe as rmoe
    from nanoseek.common import tune_cpu_allocator
    from nanoseek.config import ModelConfig
    from nanoseek.inference import LLM, SamplingParams
    from nanoseek.model import Transformer

    tune_cpu_allocator()
    shapes = MID if args.model == "mid" else {k: v for k, v in hf_config().to_dict().items() if k in MID}
    cfg = ModelConfig(**{k: v for k, v in shapes.items() if k != "num_key_value_heads"}, num_nextn_predict_layers=0,
                      initializer_range=0.02)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    busiest: list[tuple[int, int]] = []

    def record(fn):
        def wrapped(x_TD, weights_TK, idx_TK, *a, **kw):
            busiest.append((idx_TK.shape[0], int(torch.bincount(idx_TK.reshape(-1), minlength=E).max())))
            return fn(x_TD, weights_TK, idx_TK, *a, **kw)
        return wrapped
    # both ends of the capacity path: within capacity, and the exact fallback on an overflow
    rmoe.capacity_experts, rmoe.dense_experts = record(rmoe.capacity_experts), record(rmoe.dense_experts)
    torch.manual_seed(0)
    model = Transformer(cfg).init_weights(0).to(torch.bfloat16).eval()
    llm = LLM(model, max_batch=args.batch, max_len=32 + args.new + 8, compile=False)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, 32))
    llm.generate([{"prompt_token_ids": p.tolist()} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=args.new, ignore_eos=True))
    steps = [m for T, m in busiest if T == args.batch]
    mean = args.batch * K / E
    res = {"host": cpu_model(), "command": f"benchmarks/moe_overflow.py --model {args.model} --batch {args.batch} "
           f"--new {args.new}", "experts": E, "top_k": K, "mean_pairs_per_expert": mean,
           "layer_steps": len(steps), "busiest_max": max(steps), "overflowing_layer_steps": {}}
    for f in (2, 3, 4):
        cap = max(8, math.ceil(f * mean / 8) * 8)
        res["overflowing_layer_steps"][f"{f}x (capacity {cap})"] = sum(m > cap for m in steps)
    out = ROOT / "benchmarks" / "results" / f"moe_overflow_{args.model}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
