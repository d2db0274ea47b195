"""`nanoseek sample`: rejection sampling - k samples per prompt, keep the verified ones as SFT data.

R1's third stage: sample from the converged RL checkpoint, keep only completions that are correct
(the task's checker) and well formatted (`<think>...</think><answer>...</answer>`), at most
`--keep-per-prompt` per prompt, and write them as chat JSONL for `nanoseek sft` / distillation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import args as argparse_dc
from ..common import UserError, autodetect_device, print0, seed_everything, set_threads
from ..inference.sampling import SamplingParams
from .rollout import load_for_sampling, prompt_ids


@dataclass
class SampleConfig:
    model: str = field(default="", metadata={"help": "model directory to sample from"})
    out: str = field(default="runs/samples.jsonl", metadata={"help": "output chat JSONL"})
    task: str = field(default="arithmetic", metadata={"help": "task"})
    task_args: str = field(default="", metadata={"help": "task knobs"})
    tasks_file: str | None = field(default=None, metadata={"help": "JSONL of {prompt, answer} instead of --task"})
    n_prompts: int = field(default=1000, metadata={"help": "prompts (train split)"})
    k: int = field(default=4, metadata={"help": "samples per prompt"})
    keep_per_prompt: int = field(default=1, metadata={"help": "max kept samples per prompt"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=128, metadata={"help": "completion cap"})
    require_format: bool = field(default=True, metadata={"help": "keep only <think>..</think><answer>..</answer>"})
    seed: int = field(default=0, metadata={"help": "seed"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})


def rejection_sample(sampler, tok, problems, cfg: SampleConfig) -> tuple[list[dict], dict]:
    from ..data.tasks import extract_answer, get_checker, is_well_formatted

    sp = SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
    sampler.reseed(cfg.seed)
    groups = sampler.rollout([prompt_ids(tok, p.question) for p in problems], sp)
    rows, n_correct, n_format, covered = [], 0, 0, 0
    for prob, group in zip(problems, groups):
        check = get_checker(prob.task)
        kept = 0
        for c in group:
            text = tok.decode(c["ids"])
            ok = bool(check(extract_answer(text), prob))
            fmt = is_well_formatted(text)
            n_correct += ok
            n_format += fmt
            if ok and (fmt or not cfg.require_format) and not c["truncated"] and kept < cfg.keep_per_prompt:
                rows.append({"messages": [{"role": "user", "content": prob.question},
                                          {"role": "assistant", "content": text}]})
                kept += 1
        covered += kept > 0
    total = max(1, len(problems) * cfg.k)
    stats = {"prompts": len(problems), "samples": total, "correct_rate": n_correct / total,
             "format_rate": n_format / total, "kept": len(rows), "prompt_coverage": covered / max(1, len(problems))}
    return rows, stats


def main(argv=None) -> None:
    cfg = argparse_dc.parse(SampleConfig, argv, prog="nanoseek sample", description=__doc__.splitlines()[0])
    if not cfg.model:
        raise UserError("--model is required")
    from ..data.tasks import make_task

    set_threads(cfg.threads or None)
    seed_everything(cfg.seed)
    task = make_task(task=cfg.task, task_args=cfg.task_args, tasks_file=cfg.tasks_file)
    problems = task.problems(cfg.n_prompts, seed=cfg.seed, split="train")
    sampler, _, tok = load_for_sampling(cfg.model, autodetect_device(cfg.device), [p.question for p in problems],
                                        cfg.max_new_tokens, seed=cfg.seed)
    rows, stats = rejection_sample(sampler, tok, problems, cfg)
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    with open(cfg.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print0(f"kept {stats['kept']:,} of {stats['samples']:,} samples (correct {stats['correct_rate']:.1%}, "
           f"formatted {stats['format_rate']:.1%}) -> {cfg.out}")
