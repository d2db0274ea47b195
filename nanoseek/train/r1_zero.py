"""`nanoseek r1-zero` (and `make demo`): the R1-Zero story, measured, in minutes on a laptop CPU.

    1. pretrain   a tiny DeepSeek-V3 (MLA + DeepSeekMoE + MTP) from nothing on a synthetic corpus in
                  which worked <think> solutions are the minority and quick answers to hard problems are
                  often wrong (data/corpus.py). The base model "knows how to reason" but rarely does:
                  greedy decoding answers at once, and only sampling sometimes reasons.
    2. R1-Zero    pure GRPO from the base model; the only reward is "is the final answer right".
    3. evaluate   greedy pass@1 on held-out problems (a test split and seed no training step saw),
                  before and after; plus response length and reasoning / reflection rates.
    4. distill    rejection-sample verified traces from the RL model and SFT a ~4x smaller dense
                  student (pretrained on the same corpus) on them; compare with RL run directly on
                  that student (R1 sec. 4.1: distillation beats RL for small models).
Writes OUT/report.json, OUT/report.md and PNG plots; every model is an HF-format directory.

Three choices make the base model's reasoning skill form reliably within ~4.5 minutes on 2 cores,
each measured while building this (README, "How the demo was tuned"):
- document masking in pretraining (a token attends only within its own packed document, positions
  restart at its BOS - as at inference). Without it, reading the first operand's leading digit
  ("the token after *this* <｜User｜>", with earlier documents' user turns in the same window) was
  the last skill to form: two runs stalled at ~50% forced-<think> accuracy, one digit wrong;
- the loss is on the responses only (`--loss-on assistant`): the user turn is a pair of random
  operands, pure noise (~2.3 nats a digit) that otherwise dominates the gradient;
- the corpus is 3-digit sums (the held-out task's size).
With them, 800 steps give a base whose forced-<think> accuracy is ~99% while its greedy answers are
direct and almost always wrong (the carry-less shortcut), and which reasons in ~35% of samples.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import args as argparse_dc
from ..common import UserError, print0


@dataclass
class R1ZeroConfig:
    out: str = field(default="runs/r1-zero", metadata={"help": "run directory"})
    preset: str = field(default="mini", metadata={"help": "teacher model preset"})
    task: str = field(default="arithmetic", metadata={"help": "task (the default is tuned for the demo)"})
    seed: int = field(default=0, metadata={"help": "seed"})
    # pretraining
    pretrain_steps: int = field(default=800, metadata={"help": "teacher pretraining steps"})
    n_docs: int = field(default=60000, metadata={"help": "synthetic pretraining documents"})
    p_worked: float = field(default=0.35, metadata={"help": "share of documents with a worked <think> trace"})
    batch_size: int = field(default=32, metadata={"help": "pretraining batch (sequences)"})
    seq_len: int = field(default=128, metadata={"help": "pretraining sequence length"})
    lr: float = field(default=3e-3, metadata={"help": "pretraining learning rate"})
    min_digits: int = field(default=3, metadata={"help": "arithmetic corpus: smallest operand (digits)"})
    # RL
    rl_steps: int = field(default=40, metadata={"help": "GRPO steps"})
    prompts_per_step: int = field(default=16, metadata={"help": "GRPO prompts per step"})
    group_size: int = field(default=8, metadata={"help": "GRPO samples per prompt"})
    rl_lr: float = field(default=3e-4, metadata={"help": "GRPO learning rate"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion cap"})
    rl_task_args: str = field(default="min_digits=3,max_digits=3", metadata={"help": "task knobs for RL and eval"})
    eval_n: int = field(default=500, metadata={"help": "held-out problems"})
    eval_seed: int = field(default=20251123, metadata={"help": "held-out seed (test split)"})
    # distillation
    distill: bool = field(default=True, metadata={"help": "distil into a small dense student"})
    student_preset: str = field(default="mini-dense", metadata={"help": "student preset"})
    student_pretrain_steps: int = field(default=400, metadata={"help": "student base pretraining steps"})
    distill_prompts: int = field(default=8000, metadata={"help": "prompts for teacher traces"})
    student_rl: bool = field(default=True, metadata={"help": "also run GRPO directly on the student, to compare"})
    student_rl_steps: int = field(default=30, metadata={"help": "GRPO steps for the student comparison"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})


def r1_zero(cfg: R1ZeroConfig) -> dict:
    from .distill import DistillConfig, distill
    from .grpo import GRPOConfig, grpo
    from .pretrain import PretrainConfig, pretrain

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    t_all = time.perf_counter()
    times: dict[str, float] = {}

    def stage(name, title):
        print0(f"\n=== {title} " + "=" * max(0, 70 - len(title)))
        times[name] = time.perf_counter()

    def done(name):
        times[name] = round(time.perf_counter() - times[name], 1)

    stage("pretrain", "1/4 pretraining the base model")
    pre = pretrain(PretrainConfig(preset=cfg.preset, out=str(out / "base"), max_steps=cfg.pretrain_steps,
                                  batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, warmup=30,
                                  schedule="wsd", seed=cfg.seed, task=cfg.task, n_docs=cfg.n_docs,
                                  p_worked=cfg.p_worked, min_digits=cfg.min_digits, loss_on="assistant",
                                  eval_every=100, threads=cfg.threads, dtype="float32"))
    done("pretrain")
    base = out / "base" / "final"

    rl_common = dict(task=cfg.task, task_args=cfg.rl_task_args, prompts_per_step=cfg.prompts_per_step,
                     group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens, eval_n=cfg.eval_n,
                     eval_seed=cfg.eval_seed, seed=cfg.seed, threads=cfg.threads, dtype="float32")
    stage("rl", "2/4 R1-Zero: pure RL (GRPO) with an accuracy reward")
    rl = grpo(GRPOConfig(model=str(base), out=str(out / "rl"), steps=cfg.rl_steps, lr=cfg.rl_lr,
                         eval_every=max(1, cfg.rl_steps // 4), **rl_common))
    done("rl")

    report = {"task": cfg.task, "base_model": str(base), "final_model": rl["final_model"],
              "accuracy_before": rl["accuracy_before"], "accuracy_after": rl["accuracy_after"],
              "gain_points": round(100 * (rl["accuracy_after"] - rl["accuracy_before"]), 1),
              "think_rate_before": rl["think_rate_before"], "think_rate_after": rl["think_rate_after"],
              "length_before": rl["length_before"], "length_after": rl["length_after"],
              "eval": {"n": cfg.eval_n, "seed": cfg.eval_seed, "split": "test", "decoding": "greedy",
                       "task_args": cfg.rl_task_args},
              "pretrain": pre}

    if cfg.distill:
        stage("student_pretrain", "3/4 pretraining a small dense student base on the same corpus")
        spre = pretrain(PretrainConfig(preset=cfg.student_preset, out=str(out / "student-base"),
                                       max_steps=cfg.student_pretrain_steps, batch_size=cfg.batch_size,
                                       seq_len=cfg.seq_len, lr=cfg.lr, warmup=30, schedule="wsd", seed=cfg.seed,
                                       task=cfg.task,
                                       n_docs=cfg.n_docs, p_worked=cfg.p_worked, min_digits=cfg.min_digits,
                                       loss_on="assistant", eval_every=0,
                                       tokenizer=str(out / "base" / "tokenizer"), threads=cfg.threads,
                                       dtype="float32", mtp_lambda=0.0))
        done("student_pretrain")
        stage("distill", "4/4 distilling the RL model's traces into the student")
        try:
            dis = distill(DistillConfig(teacher=rl["final_model"], student=spre["final_model"],
                                        out=str(out / "distill"), task=cfg.task, task_args=cfg.rl_task_args,
                                        n_prompts=cfg.distill_prompts, k=1, max_new_tokens=cfg.max_new_tokens,
                                        eval_n=cfg.eval_n, eval_seed=cfg.eval_seed, seed=cfg.seed,
                                        threads=cfg.threads))
        except UserError as e:      # e.g. a teacher too weak to produce a single verified trace
            print0(f"distillation skipped: {e}")
            dis = None
        done("distill")
        if dis is None:
            report["distill"] = {"skipped": "the RL model produced no verified traces"}
        else:
            report["distill"] = {"student_model": dis["final_model"], "student_accuracy": dis["student_accuracy"],
                                 "teacher_accuracy": dis["teacher_accuracy"], "ratio": dis["ratio"],
                                 "student_params": dis["student_params"], "teacher_params": dis["teacher_params"],
                                 "traces": dis["traces"]}
        if cfg.student_rl:
            stage("student_rl", "comparison: GRPO directly on the student base")
            srl = grpo(GRPOConfig(model=spre["final_model"], out=str(out / "student-rl"), steps=cfg.student_rl_steps,
                                  lr=cfg.rl_lr, eval_every=0, **rl_common))
            done("student_rl")
            report["distill"]["student_base_accuracy"] = srl["accuracy_before"]
            report["distill"]["student_rl_accuracy"] = srl["accuracy_after"]
    times["total"] = round(time.perf_counter() - t_all, 1)
    report["seconds"] = times
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_report_md(out, report)
    print0(f"\nheld-out greedy accuracy: base {report['accuracy_before']:.1%} -> RL {report['accuracy_after']:.1%} "
           f"({report['gain_points']:+.1f} points) in {times['total'] / 60:.1f} min; report: {out / 'report.md'}")
    return report


def write_report_md(out: Path, r: dict) -> None:
    from .plots import plot_grpo, plot_pretrain

    plot_pretrain(out / "base" / "metrics.jsonl", out / "plots" / "pretrain.png")
    plot_grpo(out / "rl" / "metrics.jsonl", out / "plots" / "grpo.png")
    s = r["seconds"]
    lines = [
        "# R1-Zero in miniature", "",
        f"Task: `{r['task']}` ({r['eval']['task_args']}), held-out test split, seed {r['eval']['seed']}, "
        f"n={r['eval']['n']}, greedy.", "",
        "| model | greedy pass@1 | uses `<think>` | mean length (tokens) |", "|---|---|---|---|",
        f"| base (pretrained) | {r['accuracy_before']:.1%} | {r['think_rate_before']:.0%} | {r['length_before']:.1f} |",
        f"| after pure RL (GRPO) | {r['accuracy_after']:.1%} | {r['think_rate_after']:.0%} | {r['length_after']:.1f} |",
        "", f"Gain: **{r['gain_points']:+.1f} points**.", ""]
    if "distill" in r and "skipped" in r["distill"]:
        lines += ["## Distillation", "", f"Skipped: {r['distill']['skipped']}.", ""]
    elif "distill" in r:
        d = r["distill"]
        lines += ["## Distillation", "",
                  "| model | params | greedy pass@1 |", "|---|---|---|",
                  f"| RL teacher | {d['teacher_params']:,} | {d['teacher_accuracy']:.1%} |",
                  f"| distilled dense student | {d['student_params']:,} | {d['student_accuracy']:.1%} "
                  f"({d['ratio']:.0%} of teacher) |"]
        if "student_rl_accuracy" in d:
            lines += [f"| student base (pretrained only) | {d['student_params']:,} | {d['student_base_accuracy']:.1%} |",
                      f"| student + RL directly | {d['student_params']:,} | {d['student_rl_accuracy']:.1%} |"]
        lines.append("")
    lines += ["## Curves", "", "![GRPO](plots/grpo.png)", "", "![pretraining](plots/pretrain.png)", "",
              "## Time (seconds)", "", " | ".join(f"{k}: {v}" for k, v in s.items()), ""]
    (out / "report.md").write_text("\n".join(lines))


def main(argv=None) -> None:
    cfg = argparse_dc.parse(R1ZeroConfig, argv, prog="nanoseek r1-zero", description=__doc__.splitlines()[0])
    r1_zero(cfg)
