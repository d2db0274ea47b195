"""Load-balancing ablation on the `small` preset: no balancing vs classic auxiliary loss vs V3's
auxiliary-loss-free bias, same data, same tokens, same seed. Reports final train/val loss and the
expert-load max violation (max load / mean load - 1, averaged over MoE layers and the last 20 steps),
and writes benchmarks/results/ablation_balance.{json,png}.

    .venv/bin/python benchmarks/ablation_balance.py --steps 300
"""
import argparse
import json
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default="runs/ablation")
    args = ap.parse_args()
    from nanoseek.train.plots import plot_panels, read_metrics
    from nanoseek.train.pretrain import PretrainConfig, pretrain

    arms = {"none": ("none", dict(balance="none")),
            "aux loss (alpha 1e-2)": ("aux", dict(balance="aux", aux_alpha=1e-2)),
            "aux-loss-free bias (gamma 1e-3)": ("bias", dict(balance="bias", bias_gamma=1e-3, seq_aux_alpha=0.0)),
            "aux-loss-free bias (gamma 1e-2)": ("bias-1e-2", dict(balance="bias", bias_gamma=1e-2, seq_aux_alpha=0.0))}
    rows, curves = {}, {}
    for name, (slug, kw) in arms.items():
        out = Path(args.out) / slug
        done = out / "ablation_row.json"     # an arm already run with these args is reused
        if done.exists() and json.loads(done.read_text())["args"] == vars(args):
            rows[name] = json.loads(done.read_text())["row"]
        else:
            s = pretrain(PretrainConfig(preset="small", out=str(out), max_steps=args.steps, batch_size=args.batch,
                                        seq_len=args.seq, task="mix", n_docs=30000, vocab_size=1024, lr=2e-3,
                                        warmup=20, eval_every=50, plots=False, mtp_lambda=0.3, **kw))
            tail = list(read_metrics(out / "metrics.jsonl"))[-20:]
            rows[name] = {"final_loss": round(float(np.mean([r["loss"] for r in tail])), 4),
                          "val_loss": s["val_loss"],
                          "max_violation": round(float(np.mean([r["max_violation_mean"] for r in tail])), 3),
                          "tokens_per_s": round(s["tokens_per_s"], 1)}
            done.write_text(json.dumps({"args": vars(args), "row": rows[name]}))
        curves[name] = list(read_metrics(out / "metrics.jsonl"))
    res = Path("benchmarks/results")
    res.mkdir(parents=True, exist_ok=True)
    (res / "ablation_balance.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    merged = {}
    for name, recs in curves.items():
        for r in recs:
            m = merged.setdefault(r["step"], {"step": r["step"]})
            m[f"loss: {name}"] = r["loss"]
            m[f"max violation: {name}"] = r["max_violation_mean"]
    recs = [merged[k] for k in sorted(merged)]
    plot_panels(recs, [("train loss", [f"loss: {n}" for n in arms]),
                       ("expert load max violation", [f"max violation: {n}" for n in arms])],
                res / "ablation_balance.png", title=f"small preset, {args.steps} steps x {args.batch}x{args.seq} tokens")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
