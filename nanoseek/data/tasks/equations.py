"""One-variable linear equations with an integer solution, solved by undoing one operation at a time.

Three forms, each with a two-step worked solution:

    3x+5=20   -> <think>3x=20-5=15, x=15/3=5</think><answer>5</answer>
    3x-5=10   -> <think>3x=10+5=15, x=15/3=5</think><answer>5</answer>
    3(x+2)=21 -> <think>x+2=21/3=7, x=7-2=5</think><answer>5</answer>
    3(x-2)=9  -> <think>x-2=9/3=3, x=3+2=5</think><answer>5</answer>

x is drawn in [-max_solution, max_solution], a in [2, max_coef], the constant b in
[1, max_solution]; c follows. The plausible wrong direct answer is the classic sign error: moving
b across the equals sign without flipping its sign ((c+b)/a for 3x+5=c, or c/a+b for a(x+b)=c),
falling back to x+1 when that is not an integer. b is never 0, so the sign error is always wrong.
"""
from __future__ import annotations

import random
import re

from .common import Problem, Task, check_p_wrong, parse_int

FORMS = ("ax+b", "ax-b", "a(x+b)", "a(x-b)")
_X_EQUALS_RE = re.compile(r"\s*x\s*=(.*)", re.DOTALL)
_EQ_RE = re.compile(r"Solve ([0-9]+)(\(?)x([+-])([0-9]+)(\)?)=(-?[0-9]+) for x")


def _parse(problem: Problem) -> tuple[str, int, int, int]:
    """(form, a, b, c) read back from the question text, so problems loaded from JSONL work too."""
    m = _EQ_RE.fullmatch(problem.question)
    if m is None or bool(m.group(2)) != bool(m.group(5)):
        raise ValueError(f"not a linear-equation question: {problem.question!r}")
    a, sign, b, c = int(m.group(1)), m.group(3), int(m.group(4)), int(m.group(6))
    form = f"a(x{sign}b)" if m.group(2) else f"ax{sign}b"
    return form, a, b, c


class LinearEquations(Task):
    """`Solve 3x+5=20 for x` and friends; integer solutions in [-max_solution, max_solution]."""
    name = "equations"

    def __init__(self, max_coef: int = 9, max_solution: int = 20):
        if not isinstance(max_coef, int) or not 2 <= max_coef <= 1000:
            raise ValueError(f"max_coef must be an integer in [2, 1000], got {max_coef!r}")
        if not isinstance(max_solution, int) or not 1 <= max_solution <= 10**6:
            raise ValueError(f"max_solution must be an integer in [1, 1000000], got {max_solution!r}")
        self.max_coef, self.max_solution = max_coef, max_solution

    def sample(self, rng: random.Random) -> Problem:
        form = rng.choice(FORMS)
        x = rng.randint(-self.max_solution, self.max_solution)
        a = rng.randint(2, self.max_coef)
        b = rng.randint(1, self.max_solution)
        c = {"ax+b": a * x + b, "ax-b": a * x - b, "a(x+b)": a * (x + b), "a(x-b)": a * (x - b)}[form]
        eq = {"ax+b": f"{a}x+{b}={c}", "ax-b": f"{a}x-{b}={c}",
              "a(x+b)": f"{a}(x+{b})={c}", "a(x-b)": f"{a}(x-{b})={c}"}[form]
        return Problem(self.name, f"Solve {eq} for x", str(x), {"form": form, "a": a, "b": b, "c": c})

    def check(self, answer: str | None, problem: Problem) -> bool:
        if not isinstance(answer, str):
            return False
        m = _X_EQUALS_RE.fullmatch(answer)
        got, want = parse_int(m.group(1) if m else answer), parse_int(problem.answer)
        return got is not None and got == want

    def worked_solution(self, problem: Problem) -> str:
        form, a, b, c = _parse(problem)
        if form == "ax+b":
            ax = c - b
            think = f"{a}x={c}-{b}={ax}, x={ax}/{a}={ax // a}"
        elif form == "ax-b":
            ax = c + b
            think = f"{a}x={c}+{b}={ax}, x={ax}/{a}={ax // a}"
        elif form == "a(x+b)":
            inner = c // a
            think = f"x+{b}={c}/{a}={inner}, x={inner}-{b}={inner - b}"
        else:
            inner = c // a
            think = f"x-{b}={c}/{a}={inner}, x={inner}+{b}={inner + b}"
        return f"<think>{think}</think><answer>{problem.answer}</answer>"

    def direct_solution(self, problem: Problem, rng: random.Random, p_wrong: float = 0.0) -> str:
        check_p_wrong(p_wrong)
        x = int(problem.answer)
        if rng.random() >= p_wrong:
            return f"<answer>{x}</answer>"
        form, a, b, c = _parse(problem)
        if form in ("ax+b", "ax-b"):
            moved = c + b if form == "ax+b" else c - b      # b carried over with its sign unchanged
            wrong = moved // a if moved % a == 0 else x + 1
        else:
            wrong = c // a + b if form == "a(x+b)" else c // a - b
        return f"<answer>{wrong}</answer>"
