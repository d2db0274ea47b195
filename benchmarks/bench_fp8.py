"""FP8 training vs high precision: the same pretraining run (seed, data, steps) with and without --fp8.

Reports the relative gap of the mean of the last 20 training losses (the V3 report: < 0.25% between
FP8 and BF16 on 16B / 230B MoEs; the issue's bar: <= 0.5%), the final validation losses, seconds per
step of each, and plots both loss curves. On CPU FP8 is an exact emulation (fp32 GEMMs on FP8 operands):
it shows the numerics, not a speed-up; the GPU figure comes from `gpu_check.py`.

    .venv/bin/python benchmarks/bench_fp8.py --presets tiny small --steps 300
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import report


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
    except Exception:
        return platform.processor()


def run(preset: str, steps: int, fp8: bool, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", preset, "--max-steps", str(steps),
           "--out", str(out), "--compile", "off", "--no-plots", "--eval-every", "0", *extra]
    if fp8:
        cmd += ["--fp8"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**__import__("os").environ,
                                                                    "NANOSEEK_NO_PROGRESS": "1"})
    wall = time.perf_counter() - t0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    summary = json.loads((out / "summary.json").read_text())
    return {"losses": [r["loss"] for r in recs], "val_loss": summary["val_loss"], "wall_s": round(wall, 1),
            "tokens_per_s": summary["tokens_per_s"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--last", type=int, default=20)
    ap.add_argument("--extra", default="", help="more pretrain flags for both runs, e.g. '--dtype float32'")
    ap.add_argument("--name", default="bench_fp8", help="results/NAME.json and NAME.png")
    args = ap.parse_args()
    res = {"host": cpu_name(), "steps": args.steps, "command": "benchmarks/bench_fp8.py " + " ".join(sys.argv[1:]),
           "runs": {}}
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            r = {}
            for fp8 in (False, True):
                name = "fp8" if fp8 else "high_precision"
                r[name] = run(preset, args.steps, fp8, Path(tmp) / f"{preset}-{name}", args.extra.split())
            hp, f8 = (sum(r[k]["losses"][-args.last:]) / args.last for k in ("high_precision", "fp8"))
            curves[preset] = {k: r[k].pop("losses") for k in r}
            res["runs"][preset] = {
                **r, f"mean_last{args.last}_high_precision": round(hp, 5), f"mean_last{args.last}_fp8": round(f8, 5),
                "relative_gap_pct": round(100 * (f8 - hp) / hp, 3),
                "fp8_time_ratio": round(r["fp8"]["wall_s"] / r["high_precision"]["wall_s"], 2)}
            print(preset, res["runs"][preset], flush=True)
    report(args.name, res)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
        for ax, (preset, c) in zip(axes[0], curves.items()):
            for k, ys in c.items():
                ax.plot(range(1, len(ys) + 1), ys, label=k.replace("_", " "), lw=1)
            ax.set(title=f"{preset}: gap {res['runs'][preset]['relative_gap_pct']:+.2f}%", xlabel="step",
                   ylabel="train loss", yscale="log")
            ax.legend()
        fig.tight_layout()
        fig.savefig(Path(__file__).parent / "results" / f"{args.name}.png", dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
