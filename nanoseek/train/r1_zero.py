"""`nanoseek r1-zero` (and `make demo`): the R1-Zero story, measured, in minutes on a laptop CPU.

    1. pretrain   a tiny DeepSeek-V3 (MLA + DeepSeekMoE + MTP) from nothing on a synthetic corpus in
                  which worked <think> solutions are the minority and quick answers to hard problems are
                  often wrong (data/corpus.py). The base model "knows how to reason" but rarely does:
                  greedy decoding answers at once, and only sampling sometimes reasons.
    2. R1-Zero    pure GRPO from the base model; the only reward is "is the final answer right".
    3. evaluate   greedy pass@1 on held-out problems (a test split and seed no training step saw),
                  before and after; response length, and the "aha": how often each model reflects
                  ("wait, check ..."), whether reflecting pays, and one before/after transcript
                  picked by a rule (`reflection_report`).
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
With them, 800 steps give a base whose greedy answers are direct and almost always wrong (the
carry-less shortcut), and which reasons in ~35% of samples.

The "aha": the corpus writer has a habit - dropping the carry into the leading column (`--p-slip 1`)
- and notices it in 30% of those traces (`--p-catch 0.3`: "3+2=5, wait, check the carry: 3+2+1=6").
A habit cannot be fixed by sampling more carefully, only by noticing, so RL raises the rate of
noticing. Random slips (or a quick guess re-checked) are removed or avoided by RL instead; the
README ("The aha moment") has the runs that showed it.

`--task countdown` (TinyZero's task) runs the same story on a search problem with its own tuned
defaults (TASK_DEFAULTS): the worked traces try combinations, compare each with the target and
backtrack ("... vs 19 no."), and RL has to make the model search rather than guess.
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
    task: str = field(default="arithmetic", metadata={"help": "arithmetic (the demo) or countdown; flags left "
                                                             "unset take the task's tuned values (TASK_DEFAULTS)"})
    seed: int = field(default=0, metadata={"help": "seed"})
    # pretraining
    pretrain_steps: int | None = field(default=None, metadata={"help": "teacher pretraining steps"})
    n_docs: int = field(default=60000, metadata={"help": "synthetic pretraining documents"})
    p_worked: float | None = field(default=None, metadata={"help": "share of documents with a worked <think> trace"})
    batch_size: int | None = field(default=None, metadata={"help": "pretraining batch (sequences)"})
    seq_len: int | None = field(default=None, metadata={"help": "pretraining sequence length"})
    lr: float = field(default=3e-3, metadata={"help": "pretraining learning rate"})
    p_slip: float | None = field(default=None, metadata={"help": "share of worked traces with the writer's habitual "
                                                                  "slip (arithmetic: the carry into the leading "
                                                                  "column is dropped)"})
    p_catch: float = field(default=0.3, metadata={"help": "share of those slips the writer notices and repairs "
                                                           "('wait, check the carry: ...'): the seed of reflection"})
    p_guess: float = field(default=0.0, metadata={"help": "share of worked traces that open with a quick answer"})
    p_recheck: float = field(default=0.0, metadata={"help": "share of those quick answers then re-evaluated "
                                                             "('wait, check: ...' and worked out)"})
    min_digits: int = field(default=3, metadata={"help": "arithmetic corpus: smallest operand (digits)"})
    # RL
    rl_steps: int | None = field(default=None, metadata={"help": "GRPO steps"})
    prompts_per_step: int = field(default=16, metadata={"help": "GRPO prompts per step"})
    group_size: int = field(default=8, metadata={"help": "GRPO samples per prompt"})
    rl_lr: float = field(default=3e-4, metadata={"help": "GRPO learning rate"})
    max_new_tokens: int | None = field(default=None, metadata={"help": "completion cap"})
    rl_task_args: str | None = field(default=None, metadata={"help": "task knobs for RL and eval, and for the "
                                                                               "corpus (arithmetic's: --min-digits)"})
    eval_n: int = field(default=500, metadata={"help": "held-out problems"})
    eval_seed: int = field(default=20251123, metadata={"help": "held-out seed (test split)"})
    reflect_n: int = field(default=200, metadata={"help": "held-out problems for the sampled reflection measurement"})
    reflect_samples: int = field(default=4, metadata={"help": "samples per problem (temperature 1) for it"})
    # distillation
    distill: bool | None = field(default=None, metadata={"help": "distil into a small dense student"})
    student_preset: str = field(default="mini-dense", metadata={"help": "student preset"})
    student_pretrain_steps: int = field(default=400, metadata={"help": "student base pretraining steps"})
    # 4,000: the student reached 99.8% from 3,821 traces of the RL model in 104 s, against 100.0% from 7,665
    # in 198 s with 8,000 (AVX2 EPYC, the same teacher and student base), which kept the job over 15 min there
    distill_prompts: int = field(default=4000, metadata={"help": "prompts for teacher traces"})
    student_rl: bool = field(default=True, metadata={"help": "also run GRPO directly on the student, to compare"})
    student_rl_steps: int = field(default=30, metadata={"help": "GRPO steps for the student comparison"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})


# What each task's main job runs with, for the flags the user leaves unset (each measured; README).
TASK_DEFAULTS = {
    "arithmetic": dict(pretrain_steps=800, batch_size=32, seq_len=128, p_worked=0.35, p_slip=1.0, rl_steps=40,
                       max_new_tokens=64, rl_task_args="min_digits=3,max_digits=3", distill=True),
    "countdown": dict(pretrain_steps=1500, batch_size=16, seq_len=256, p_worked=0.3, p_slip=0.0, rl_steps=80,
                      max_new_tokens=192, rl_task_args="n_numbers=3,max_number=9,max_target=50", distill=False),
}


def resolve(cfg: R1ZeroConfig) -> R1ZeroConfig:
    """`cfg` with every unset (None) field filled from the task's TASK_DEFAULTS row."""
    from dataclasses import replace

    from ..data.tasks import TASKS
    if cfg.task not in TASKS:
        raise UserError(f"--task {cfg.task}: unknown; choose one of {', '.join(sorted(TASKS))}")
    row = TASK_DEFAULTS.get(cfg.task, {**TASK_DEFAULTS["arithmetic"], "rl_task_args": ""})
    cfg = replace(cfg, **{k: v for k, v in row.items() if getattr(cfg, k) is None})
    for name in ("p_worked", "p_slip", "p_catch", "p_guess", "p_recheck"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: a share, must be in [0, 1]")
    # counts checked here, before ~7 minutes of pretraining, rather than by the stage that reads them
    for name in ("pretrain_steps", "n_docs", "batch_size", "seq_len", "rl_steps", "prompts_per_step",
                 "max_new_tokens", "eval_n", "reflect_n", "reflect_samples", "student_pretrain_steps",
                 "distill_prompts", "student_rl_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be at least 1")
    if cfg.group_size < 2:
        raise UserError(f"--group-size {cfg.group_size}: GRPO compares samples of a prompt, so at least 2")
    return cfg


def r1_zero(cfg: R1ZeroConfig) -> dict:
    from .distill import DistillConfig, distill
    from .grpo import GRPOConfig, grpo
    from .pretrain import PretrainConfig, pretrain

    cfg = resolve(cfg)
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

    corpus = dict(p_slip=cfg.p_slip, p_catch=cfg.p_catch, p_guess=cfg.p_guess, p_recheck=cfg.p_recheck,
                  task_args="" if cfg.task == "arithmetic" else cfg.rl_task_args)      # arithmetic: --min-digits
    stage("pretrain", "1/4 pretraining the base model")
    # fp32 and eager: the same figures on every run of a host. `--compile auto` decides from the first
    # steps' timing, and compiled steps round differently: one demo compiled after a slow start and
    # its base model reached 95.4% after RL instead of 99.8%
    pre = pretrain(PretrainConfig(preset=cfg.preset, out=str(out / "base"), max_steps=cfg.pretrain_steps,
                                  batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, warmup=30,
                                  schedule="wsd", seed=cfg.seed, task=cfg.task, n_docs=cfg.n_docs,
                                  p_worked=cfg.p_worked, min_digits=cfg.min_digits, loss_on="assistant",
                                  eval_every=100, threads=cfg.threads, dtype="float32", compile="off", **corpus))
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
    t_reflect = time.perf_counter()
    report.update(reflection_report(cfg, base, Path(rl["final_model"])))
    times["reflection"] = round(time.perf_counter() - t_reflect, 1)

    if cfg.distill:
        stage("student_pretrain", "3/4 pretraining a small dense student base on the same corpus")
        spre = pretrain(PretrainConfig(preset=cfg.student_preset, out=str(out / "student-base"),
                                       max_steps=cfg.student_pretrain_steps, batch_size=cfg.batch_size,
                                       seq_len=cfg.seq_len, lr=cfg.lr, warmup=30, schedule="wsd", seed=cfg.seed,
                                       task=cfg.task,
                                       n_docs=cfg.n_docs, p_worked=cfg.p_worked, min_digits=cfg.min_digits,
                                       **corpus,
                                       loss_on="assistant", eval_every=0,
                                       tokenizer=str(out / "base" / "tokenizer"), threads=cfg.threads,
                                       dtype="float32", compile="off", mtp_lambda=0.0))
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
    f = report["reflection"]
    print0(f"reflection ('wait, check ...', sampled at temperature 1): {f['reflection_rate_before']:.1%} of the base "
           f"model's completions -> {f['reflection_rate_after']:.1%} after RL (greedy "
           f"{f['greedy_reflection_rate_before']:.1%} -> {f['greedy_reflection_rate_after']:.1%})")
    if cfg.task == "countdown":
        print0(f"backtracking (sampled): {f['backtrack_rate_before']:.1%} -> {f['backtrack_rate_after']:.1%}")
    if cfg.task == "arithmetic":
        print0("next: a task that needs search and backtracking, the same story: "
               "nanoseek r1-zero --task countdown --out runs/r1-zero-countdown")
    return report


def reflection_report(cfg: R1ZeroConfig, base: Path, rl_model: Path) -> dict:
    """Reflection before and after RL, measured on the policy's own distribution (temperature 1,
    `reflect_samples` per held-out problem: greedy decoding hides a behaviour the policy takes with
    probability < 1/2), with greedy figures beside it; and one "aha" pair chosen by a fixed rule:
    the first held-out problem the base model's greedy answer gets wrong and the RL model gets right
    in a completion that reflects - for countdown, that backtracks (its greedy one if that does, else
    its first such sample)."""
    from ..common import autodetect_device
    from ..data.tasks import make_task
    from .rollout import BACKTRACK, REFLECTION, evaluate, load_for_sampling

    problems = make_task(cfg.task, cfg.rl_task_args).problems(cfg.reflect_n, seed=cfg.eval_seed, split="test")
    device = autodetect_device(None)
    res = {}
    for name, path in (("before", base), ("after", rl_model)):
        sampler, _, tok = load_for_sampling(path, device, [p.question for p in problems], cfg.max_new_tokens,
                                            seed=cfg.eval_seed)
        res[name] = {"greedy": evaluate(sampler, tok, problems, cfg.max_new_tokens, seed=cfg.eval_seed,
                                        return_texts=True),
                     "sampled": evaluate(sampler, tok, problems, cfg.max_new_tokens, temperature=1.0,
                                         samples=cfg.reflect_samples, seed=cfg.eval_seed, return_texts=True)}
    from ..data.tasks import extract_answer, get_checker
    example, revisits = None, BACKTRACK if cfg.task == "countdown" else REFLECTION
    for i, prob in enumerate(problems):
        check = get_checker(prob.task)
        base_text = res["before"]["greedy"]["texts"][i][0]
        if check(extract_answer(base_text), prob):
            continue
        candidates = res["after"]["greedy"]["texts"][i] + res["after"]["sampled"]["texts"][i]
        fixed = [t for t in candidates if revisits.search(t) and check(extract_answer(t), prob)]
        if fixed:
            example = {"index": i, "question": prob.question, "answer": prob.answer, "base_greedy": base_text,
                       "rl": fixed[0], "rl_decoding": "greedy" if fixed[0] == candidates[0] else "sampled (T=1)"}
            break
    keys = ("reflection_rate", "self_correction_rate", "accuracy_reflecting", "accuracy_not_reflecting", "accuracy",
            "think_rate", "backtrack_rate", "mean_length")
    out = {"reflection": {"n": len(problems), "samples": cfg.reflect_samples, "temperature": 1.0,
                          **{f"{k}_{when}": res[when]["sampled"][k] for k in keys for when in ("before", "after")},
                          **{f"greedy_{k}_{when}": res[when]["greedy"][k]
                             for k in keys for when in ("before", "after")}},
           "aha_example": example and {**example,
                                       "rule": "backtracks" if cfg.task == "countdown" else "reflects"}}
    out["reflection_rate_before"] = res["before"]["sampled"]["reflection_rate"]
    out["reflection_rate_after"] = res["after"]["sampled"]["reflection_rate"]
    return out


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
    if "reflection" in r:
        f = r["reflection"]

        def pct(x):
            return "-" if x is None else f"{x:.1%}"
        lines += ["## Reflection (the \"aha moment\")", "",
                  f"Sampled at temperature 1, {f['samples']} completions for each of {f['n']} held-out problems "
                  "(the policy's own distribution); greedy in brackets. A completion *reflects* if it says "
                  "wait / check / verify; a *self-correction* reflects and ends right; it *backtracks* if it "
                  "abandons an attempt (\"... no.\") and tries another.", "",
                  "| model | reflects | self-corrects | accuracy when reflecting | when not | backtracks | pass@1 |",
                  "|---|---|---|---|---|---|---|"]
        for when, label in (("before", "base"), ("after", "after RL")):
            lines.append(f"| {label} | {pct(f[f'reflection_rate_{when}'])} "
                         f"({pct(f[f'greedy_reflection_rate_{when}'])}) | {pct(f[f'self_correction_rate_{when}'])} | "
                         f"{pct(f[f'accuracy_reflecting_{when}'])} | {pct(f[f'accuracy_not_reflecting_{when}'])} | "
                         f"{pct(f[f'backtrack_rate_{when}'])} ({pct(f[f'greedy_backtrack_rate_{when}'])}) | "
                         f"{pct(f[f'accuracy_{when}'])} ({pct(f[f'greedy_accuracy_{when}'])}) |")
        ex = r.get("aha_example")
        rule = "backtracks" if r["task"] == "countdown" else "reflects"
        lines += ["", "Rule for the example below: the first held-out problem the base model's greedy answer gets "
                  f"wrong and the RL model gets right in a completion that {rule}.", ""]
        if ex:
            lines += [f"Problem {ex['index']}: `{ex['question']}` (answer {ex['answer']})", "",
                      "Base model, greedy:", "", "```", ex["base_greedy"], "```", "",
                      f"After RL, {ex['rl_decoding']}:", "", "```", ex["rl"], "```", ""]
        else:
            lines += ["No held-out problem met the rule.", ""]
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
