"""User-supplied problems from a JSONL file, graded by math_verify or by a registered task's checker.

One JSON object per line:

    {"prompt": "What is 1/2 + 1/4?", "answer": "3/4"}
    {"prompt": "Use 25 7 3 4 to make 58", "answer": "(25-7)*3+4", "task": "countdown"}

`prompt` (string) and `answer` (string or number) are required. `task`, if given, must be a
registered task name (see `nanoseek.data.tasks.TASKS`); that task's checker then grades the line.
Lines without one get `task_name` (default "jsonl"); a registered `task_name` makes the whole file
that task.
Any other keys are kept in `Problem.meta` (a countdown line may carry "numbers" and "target").

A typo in line 40,312 of a scraped file should not cost a training run, and should not pass
silently either: bad lines are reported as `path:line: reason`; by default they are skipped with
a warning on stderr, with `strict=True` the first one raises.

Without a registered task, answers are compared with math_verify (`parse` both, then
`verify(gold, pred)`), after a cheap exact match on whitespace-normalised text, so `\\frac{1}{2}`
matches `0.5`. math_verify guards each call with SIGALRM, which only works on the main thread;
elsewhere we call it without a timeout and rely on the length cap instead.
"""
from __future__ import annotations

import json
import math
import random
import sys
import threading
from pathlib import Path

from .common import Problem, Task, check_split, split_of

MAX_WARNINGS_SHOWN = 20
MAX_MATH_CHARS = 2000


def _registered() -> dict:
    from . import TASKS          # the package imports this module before TASKS exists, so look it up late
    return TASKS


def _normalise(text: str) -> str:
    return " ".join(text.split())


def math_check(answer: str | None, problem: Problem) -> bool:
    """math_verify equivalence of `answer` and `problem.answer`; False on any failure."""
    if not isinstance(answer, str) or not isinstance(problem.answer, str):
        return False
    if _normalise(answer) == _normalise(problem.answer) and answer.strip():
        return True
    if len(answer) > MAX_MATH_CHARS:
        return False
    try:
        from math_verify import parse, verify
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        gold = parse(problem.answer, parsing_timeout=timeout)
        pred = parse(answer, parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:           # math_verify or sympy choking on odd input is a wrong answer, not a crash
        return False


def _problem_from_line(line: str, task_name: str) -> Problem:
    """Parse one non-blank line; ValueError with the reason (no location) if it is malformed."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    prompt, answer, task = obj.get("prompt"), obj.get("answer"), obj.get("task")
    if "prompt" not in obj:
        raise ValueError("missing required field 'prompt'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"field 'prompt' must be a non-empty string, got {prompt!r}")
    if "answer" not in obj:
        raise ValueError("missing required field 'answer'")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"field 'answer' must be a string or a number, got {type(answer).__name__}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise ValueError(f"field 'answer' must be finite, got {answer!r}")
    if task is not None:
        known = _registered()
        if not isinstance(task, str) or task not in known:
            raise ValueError(f"unknown task {task!r} (known: {', '.join(sorted(known))})")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "answer", "task")}
    return Problem(task or task_name, prompt, str(answer), meta)


def load_jsonl_problems(path: str | Path, strict: bool = False, task_name: str = "jsonl") -> list[Problem]:
    """Problems from a JSONL file. Malformed lines: skipped with a stderr warning, or raise if strict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL problem file not found: {path}")
    if not isinstance(task_name, str) or not task_name:
        raise ValueError(f"task_name must be a non-empty string, got {task_name!r}")
    problems, warnings = [], []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                problems.append(_problem_from_line(line, task_name))
            except ValueError as e:
                message = f"{path}:{lineno}: {e}"
                if strict:
                    raise ValueError(message) from None
                warnings.append(message)
    if warnings:
        shown = warnings[:MAX_WARNINGS_SHOWN]
        more = len(warnings) - len(shown)
        tail = f"\n  ... and {more} more malformed line(s)" if more else ""
        print(f"warning: skipped {len(warnings)} malformed line(s) of {path}:\n  " + "\n  ".join(shown) + tail,
              file=sys.stderr)
    return problems


class JsonlTask(Task):
    """A fixed list of problems as a Task. Splits follow the same question hash as generated tasks,
    so about 10% of a file is the test split. There is no solver: `worked_solution` and
    `direct_solution` raise NotImplementedError."""
    name = "jsonl"

    def __init__(self, problems: list[Problem]):
        problems = list(problems)
        if not problems:
            raise ValueError("JsonlTask needs at least one problem")
        if not all(isinstance(p, Problem) for p in problems):
            raise ValueError("JsonlTask takes a list of Problem (see load_jsonl_problems)")
        self.all_problems = problems
        self.by_split = {s: [p for p in problems if split_of(p.question) == s] for s in ("train", "test")}

    def sample(self, rng: random.Random) -> Problem:
        return rng.choice(self.all_problems)

    def problems(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        """Each problem of the split once (in a seeded order) before any repeats."""
        check_split(split)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        pool = self.by_split[split]
        if not pool and n:
            raise ValueError(f"no problem of this file falls in split={split!r} "
                             f"({len(self.all_problems)} problems in all)")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            out.extend(order[: n - len(out)])
        return out

    def check(self, answer: str | None, problem: Problem) -> bool:
        from . import get_checker
        return get_checker(problem.task)(answer, problem)

    def worked_solution(self, problem: Problem) -> str:
        raise NotImplementedError("JsonlTask has no solver, so it cannot write a worked solution")

    def direct_solution(self, problem: Problem, rng: random.Random, p_wrong: float = 0.0) -> str:
        raise NotImplementedError("JsonlTask has no solver, so it cannot write a direct solution")
