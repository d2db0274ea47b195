"""AdamW's optimizer step on CPU: torch's single-kernel (fused) update vs the foreach one, on the
presets' parameters (alternating, same process), and how far apart their weights are after 20 steps.

    .venv/bin/python benchmarks/bench_adamw.py [--presets small mini] [--steps 10]
"""
import argparse
import time

import torch

from results_io import report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["small", "mini"])
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    from bench_decode import cpu_model
    from nanoseek.common import tune_cpu_allocator
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.train.optim import build_optimizer
    tune_cpu_allocator()
    res = {"host": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__, "ms_per_step": {}}
    for name in args.presets:
        model = Transformer(load_preset(name)).init_weights(0)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        times = {"foreach": [], "fused": []}
        for fused in (False, True, False, True):             # alternating rounds
            opt = build_optimizer(model, 1e-4, fused=fused)
            for _ in range(3):
                opt.step()
            t = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times["fused" if fused else "foreach"].append(round((time.perf_counter() - t) / args.steps * 1e3, 2))
        weights = []
        for fused in (False, True):
            torch.manual_seed(0)
            m = Transformer(load_preset(name)).init_weights(0)
            opt = build_optimizer(m, 1e-3, fused=fused)
            g = torch.Generator().manual_seed(1)
            for _ in range(20):
                for p in m.parameters():
                    p.grad = torch.randn(p.shape, generator=g) * 1e-2
                opt.step()
            weights.append(list(m.parameters()))
        diff = max(float((a - b).abs().max()) for a, b in zip(*weights))
        res["ms_per_step"][name] = {"params": sum(p.numel() for p in model.parameters()), **times,
                                    "max_weight_diff_after_20_steps": diff}
        print(name, res["ms_per_step"][name], flush=True)
    report("bench_adamw", res)


if __name__ == "__main__":
    main()
