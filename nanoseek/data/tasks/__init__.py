"""Verifiable tasks: generators that own their checkers, plus user problems from JSONL.

`problem.task` names the checker that grades a problem: a registered task's `check` if the name
is in TASKS, math_verify equivalence otherwise (JSONL problems). `get_checker` is that rule, and
the accuracy reward and `JsonlTask` both go through it. Checkers ignore difficulty knobs, so a
default-constructed task grades any problem of its kind.
"""
from __future__ import annotations

import json
from typing import Callable

from ...errors import UserError

from .arithmetic import Arithmetic, needs_carry
from .common import Problem, Task, extract_answer, extract_think, is_well_formatted, split_of
from .countdown import Countdown, solve
from .equations import LinearEquations
from .jsonl import JsonlTask, load_jsonl_problems, math_check

TASKS: dict[str, type[Task]] = {"arithmetic": Arithmetic, "countdown": Countdown, "equations": LinearEquations}


def get_task(name: str, **knobs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](**knobs)


def parse_knobs(text: str) -> dict:
    """'min_digits=3,max_digits=3' -> {"min_digits": 3, "max_digits": 3} (values as JSON where they parse)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise UserError(f"--task-args {text!r}: expected key=value pairs, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def make_task(task: str = "arithmetic", task_args: str = "", tasks_file: str | None = None) -> Task:
    """The task of the trainers' and evaluators' --task / --task-args / --tasks-file flags."""
    if tasks_file:
        return JsonlTask(load_jsonl_problems(tasks_file))
    try:
        return get_task(task, **parse_knobs(task_args))
    except (ValueError, TypeError) as e:
        raise UserError(f"--task {task} --task-args {task_args!r}: {e}") from None


def get_checker(name: str) -> Callable[[str | None, Problem], bool]:
    """check(answer, problem) for problems whose task field is `name`."""
    return TASKS[name]().check if name in TASKS else math_check


__all__ = ["TASKS", "get_task", "get_checker", "make_task", "parse_knobs", "Task", "Problem", "extract_answer",
           "extract_think",
           "is_well_formatted", "split_of", "load_jsonl_problems", "JsonlTask", "math_check", "Arithmetic",
           "Countdown", "LinearEquations", "needs_carry", "solve"]
