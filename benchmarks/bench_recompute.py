"""Activation checkpointing (`pretrain --recompute`): activation memory saved for backward and step time,
with and without, on one model in one run.

    .venv/bin/python benchmarks/bench_recompute.py --preset small --batch 8 --seq 256
"""
import argparse
import copy
import time

import torch
from results_io import report


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    from bench_decode import cpu_model

    from nanoseek.common import autocast, compute_dtype
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.train.losses import forward_losses
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.pretrain import PretrainConfig
    from nanoseek.train.recompute import checkpoint_blocks, saved_activation_bytes

    cfg = load_preset(args.preset)
    dev = torch.device("cpu")
    dtype = compute_dtype(dev, None, cfg.hidden_size, args.batch * args.seq)
    torch.manual_seed(0)
    plain = Transformer(cfg).init_weights(0).train()
    models = {"plain": plain, "recompute": copy.deepcopy(plain)}
    checkpoint_blocks(models["recompute"])
    pc = PretrainConfig()
    batch = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    res = {"host": cpu_model(), "preset": args.preset, "batch": [args.batch, args.seq],
           "dtype": str(dtype).removeprefix("torch.")}
    opts = {k: build_optimizer(m, 1e-4) for k, m in models.items()}

    def step(name):
        with autocast(dev, dtype):
            loss = forward_losses(models[name], batch, pc)["total"]
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)

    for name in models:
        box = {}

        def fwd():
            with autocast(dev, dtype):
                box["loss"] = forward_losses(models[name], batch, pc)["total"]
        res[f"{name}_saved_mb"] = round(saved_activation_bytes(fwd) / 2**20, 1)
        box["loss"].backward()
        opts[name].zero_grad(set_to_none=True)
    times = {k: [] for k in models}
    for _ in range(args.steps + 1):               # interleaved, the first round a warm-up
        for name in models:
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    for name in models:
        res[f"{name}_step_s"] = round(sorted(times[name][1:])[len(times[name][1:]) // 2], 3)
    res["saved_ratio"] = round(res["recompute_saved_mb"] / res["plain_saved_mb"], 3)
    res["time_ratio"] = round(res["recompute_step_s"] / res["plain_step_s"], 2)
    report("bench_recompute", res)


if __name__ == "__main__":
    main()
