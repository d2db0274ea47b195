"""What `common.tune_cpu_allocator()` (every `nanoseek` command calls it) does to CPU speed and memory.

    .venv/bin/python benchmarks/bench_allocator.py [--rounds 3]

Each measurement runs in a fresh process (the setting is process-wide), alternating glibc's defaults
(NANOSEEK_MALLOC=system) and the setting, `--rounds` times, so drift in the host's speed hits both:
1. cast   a 2048 x 4096 bf16 tensor to fp32 (the size of `small`'s logits at 8 x 256 tokens), median
          of 10 calls, and the minor page faults they took;
2. train  one `small` pretraining step (8 x 256 tokens, bf16 autocast, MTP loss, AdamW, what `nanoseek
          pretrain` runs), median of 8 after 3 warm-up steps, and the process's peak RSS.
Writes benchmarks/results/bench_allocator.json.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, resource, sys, time
from nanoseek.common import tune_cpu_allocator
applied = tune_cpu_allocator()
import torch
what = sys.argv[1]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if what == "cast":
    x = torch.randn(2048, 4096).bfloat16()
    x.float()
    ts, f0 = [], faults()
    for _ in range(10):
        t = time.perf_counter(); x.float(); ts.append(time.perf_counter() - t)
    out = {"ms": 1e3 * sorted(ts)[5], "faults_per_call": (faults() - f0) / 10}
else:
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.model.moe import update_bias
    from nanoseek.train.losses import forward_losses
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.pretrain import PretrainConfig
    cfg = load_preset("small")
    torch.manual_seed(0)
    m = Transformer(cfg).init_weights(0).train()
    opt, pc = build_optimizer(m, 1e-4), PretrainConfig()
    batch = torch.randint(0, cfg.vocab_size, (8, 257))
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward_losses(m, batch, pc)["total"]
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        for moe in m.moe_layers():
            update_bias(moe, 1e-3)
    for _ in range(3):
        step()
    ts = []
    for _ in range(8):
        t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
    out = {"step_s": sorted(ts)[4], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
out["glibc_applied"] = applied
print(json.dumps(out))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    from bench_decode import cpu_model
    base = {k: v for k, v in os.environ.items() if k not in ("NANOSEEK_MALLOC", "THP_MEM_ALLOC_ENABLE")}
    base["PYTHONPATH"] = str(root)
    runs = {f"{what}_{mode}": [] for what in ("cast", "train") for mode in ("system", "tuned")}
    for r in range(args.rounds):
        for what in ("cast", "train"):
            for mode in ("system", "tuned"):
                env = {**base, "NANOSEEK_MALLOC": mode}
                p = subprocess.run([sys.executable, "-c", CHILD, what], env=env, capture_output=True, text=True,
                                   timeout=900)
                if p.returncode:
                    raise SystemExit(p.stderr[-2000:])
                runs[f"{what}_{mode}"].append(json.loads(p.stdout.strip().splitlines()[-1]))
                print(r, what, mode, runs[f"{what}_{mode}"][-1], flush=True)
    res = {"host": cpu_model(), "command": "benchmarks/bench_allocator.py --rounds %d" % args.rounds, "runs": runs,
           "cast_ms": {m: [round(x["ms"], 2) for x in runs[f"cast_{m}"]] for m in ("system", "tuned")},
           "train_step_s": {m: [round(x["step_s"], 3) for x in runs[f"train_{m}"]] for m in ("system", "tuned")},
           "train_peak_rss_mb": {m: [round(x["peak_rss_mb"]) for x in runs[f"train_{m}"]] for m in ("system", "tuned")},
           "train_speedup_per_round": [round(a["step_s"] / b["step_s"], 2)
                                       for a, b in zip(runs["train_system"], runs["train_tuned"])]}
    out = root / "benchmarks" / "results" / "bench_allocator.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
