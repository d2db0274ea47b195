"""`nanoseek eval`: pass@1 / cons@k / length on held-out problems of a verifiable task.

Greedy by default (pass@1 = accuracy of one greedy answer). With `--samples k --temperature 0.6
--top-p 0.95` it reports R1's protocol: pass@1 as the mean correctness over k samples, and cons@k,
the majority vote over the k extracted answers. Problems come from the task's test split, which is
disjoint from every training split.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import args as argparse_dc
from ..common import UserError, autodetect_device, print0, seed_everything, set_threads
from .rollout import evaluate, load_for_sampling


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "model directory"})
    task: str = field(default="arithmetic", metadata={"help": "task name"})
    task_args: str = field(default="", metadata={"help": "task knobs, e.g. 'min_digits=3,max_digits=3'"})
    tasks_file: str | None = field(default=None, metadata={"help": "JSONL of {prompt, answer} instead of --task"})
    n: int = field(default=200, metadata={"help": "problems"})
    seed: int = field(default=12345, metadata={"help": "seed of the problems (test split)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    samples: int = field(default=1, metadata={"help": "k samples per problem (pass@1 = mean, cons@k = vote)"})
    max_new_tokens: int = field(default=128, metadata={"help": "completion cap"})
    json: bool = field(default=False, metadata={"help": "print JSON"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})


def run_eval(cfg: EvalConfig) -> dict:
    from ..data.tasks import make_task

    if not cfg.model:
        raise UserError("--model is required")
    if cfg.samples < 1 or cfg.n < 1:
        raise UserError("--n and --samples must be >= 1")
    if cfg.samples > 1 and cfg.temperature == 0:
        raise UserError("--samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    set_threads(cfg.threads or None)
    seed_everything(cfg.seed)
    task = make_task(task=cfg.task, task_args=cfg.task_args, tasks_file=cfg.tasks_file)
    problems = task.problems(cfg.n, seed=cfg.seed, split="test")
    sampler, _, tok = load_for_sampling(cfg.model, autodetect_device(cfg.device), [p.question for p in problems],
                                        cfg.max_new_tokens, seed=cfg.seed)
    res = evaluate(sampler, tok, problems, cfg.max_new_tokens, cfg.temperature, cfg.samples, cfg.top_p, cfg.seed)
    res.update({"task": cfg.task, "model": cfg.model})
    return res


def main(argv=None) -> None:
    cfg = argparse_dc.parse(EvalConfig, argv, prog="nanoseek eval", description=__doc__.splitlines()[0])
    res = run_eval(cfg)
    if cfg.json:
        print(json.dumps(res, indent=2))
    else:
        k = cfg.samples
        print0(f"{cfg.task}: pass@1 {res['accuracy']:.3f}  cons@{k} {res[f'cons@{k}']:.3f}  "
               f"mean length {res['mean_length']:.1f}  think {res['think_rate']:.2f}  (n={res['n']})")
