"""Verifiable tasks: generators that own their checkers, plus user problems from JSONL.

`problem.task` names the checker that grades a problem: a registered task's `check` if the name
is in TASKS, math_verify equivalence otherwise (JSONL problems). `get_checker` is that rule, and
the accuracy reward and `JsonlTask` both go through it. Checkers ignore difficulty knobs, so a
default-constructed task grades any problem of its kind.
"""
from __future__ import annotations

from typing import Callable

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


def get_checker(name: str) -> Callable[[str | None, Problem], bool]:
    """check(answer, problem) for problems whose task field is `name`."""
    return TASKS[name]().check if name in TASKS else math_check


__all__ = ["TASKS", "get_task", "get_checker", "Task", "Problem", "extract_answer", "extract_think",
           "is_well_formatted", "split_of", "load_jsonl_problems", "JsonlTask", "math_check", "Arithmetic",
           "Countdown", "LinearEquations", "needs_carry", "solve"]
