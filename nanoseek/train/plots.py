"""PNG plots of training curves from a metrics.jsonl (matplotlib, headless)."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def plot_panels(records: list[dict], panels: list[tuple[str, list[str]]], out: str | Path, title: str = "",
                x: str = "step") -> Path | None:
    """One subplot per (title, [metric keys]); keys missing from every record are skipped."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, [k for k in keys if any(k in r for r in records)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not records or not panels:
        return None
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, (ptitle, keys) in zip(axes.flat, panels):
        for k in keys:
            pts = [(r[x], r[k]) for r in records if k in r and isinstance(r[k], (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=k, marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(ptitle)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_pretrain(metrics_path, out) -> Path | None:
    return plot_panels(read_metrics(metrics_path), [
        ("loss", ["loss", "val_loss"]), ("MTP loss", ["mtp_loss"]), ("learning rate", ["lr"]),
        ("grad norm", ["grad_norm"]), ("expert load max violation", ["max_violation_mean"]),
        ("tokens / s", ["tokens_per_s"])], out, title="pretraining")


def plot_grpo(metrics_path, out) -> Path | None:
    recs = read_metrics(metrics_path)
    return plot_panels(recs, [
        ("reward / held-out accuracy", ["reward", "reward_accuracy", "eval_accuracy"]),
        ("completion length (tokens)", ["completion_len", "eval_mean_length"]),
        ("reasoning: <think> and reflection rates", ["think_rate", "reflection_rate", "backtrack_rate",
                                                      "eval_think_rate", "eval_reflection_rate"]),
        ("reflection: does it pay?", ["self_correction_rate", "accuracy_reflecting", "accuracy_not_reflecting"]),
        ("KL / clip fraction", ["kl", "clip_frac"]), ("entropy", ["entropy"]),
        ("zero-variance groups", ["frac_zero_std"])], out, title="GRPO")
