"""The grouped MoE decode path vs the rules' path (gather / fused dense / capacity), eager decode steps.

bench_grpo's model shape (hidden 256, 4 layers, 16 experts top-4, vocab 300), random weights. Two
runners over one model in one process: one plans as the runner does (the grouped path where
`grouped_pays` measured it faster), one with `grouped_pays` answering False (the rules alone). They
take turns, best of --repeat rounds of 20 steps each, per batch size. Eager: what GRPO's rollouts
and a default engine below its compile break-even run. x86-64 with AVX2 only (the kernel's hosts).

    .venv/bin/python benchmarks/bench_grouped_moe.py --batches 1 8 64
"""
import argparse
import time

import torch
from bench_decode import cpu_model
from bench_model import hf_config
from results_io import report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from nanoseek.common import tune_cpu_allocator
    tune_cpu_allocator()
    from nanoseek.config import ModelConfig
    from nanoseek.inference.engine import Engine
    from nanoseek.inference.runner import weights
    from nanoseek.model import Transformer

    measured_choice, grouped = weights.grouped_pays, {"on": True}
    weights.grouped_pays = lambda *a: grouped["on"] and measured_choice(*a)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf_dict(hf_config(vocab_size=300, max_position_embeddings=512).to_dict()))
    model.eval()
    res = {"host": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "step_ms": {}}
    for B in args.batches:
        runners = {}
        for name in ("grouped", "rules"):
            grouped["on"] = name == "grouped"
            runners[name] = Engine(model, max_batch=max(args.batches), max_len=256, compile=False).runner
        ids = torch.randint(0, 300, (B,), generator=torch.Generator().manual_seed(B)).tolist()
        best = dict.fromkeys(runners, float("inf"))
        for _ in range(args.repeat):
            for name, r in runners.items():
                grouped["on"] = name == "grouped"
                r.decode(ids, [40] * B)
                t = time.perf_counter()
                for _ in range(20):
                    r.decode(ids, [40] * B)
                best[name] = min(best[name], (time.perf_counter() - t) / 20)
        paths = {n: sorted({v for k, v in r.plan(r.bucket(B)).items() if k.endswith(".path")}) for n, r in runners.items()}
        res["step_ms"][B] = {**{n: round(v * 1e3, 2) for n, v in best.items()}, "speedup": round(best["rules"] / best["grouped"], 2),
                             "paths": paths}
    report("bench_grouped_moe", res)


if __name__ == "__main__":
    main()
