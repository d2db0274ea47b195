"""Multi-digit addition and subtraction, with the column method written out as the reasoning.

The smallest task on which a tiny model visibly gains from RL: direct answers get the easy
(no-carry) sums right and the carry sums wrong, while the worked column trace

    347+285 -> <think>7+5=12, 4+8+1=13, 3+2+1=6, so 632</think><answer>632</answer>
    532-285 -> <think>2-5+10=7, 3-8-1+10=4, 5-2-1=2, so 247</think><answer>247</answer>

makes every carry and borrow an explicit token. Columns run from the right; a missing digit is 0;
a carry-in is shown as "+1" and a borrow-in as "-1" only when there is one; "+10" marks a borrow
taken by the column.

The plausible wrong direct answer is the "carry-less shortcut" a model falls into: every column
computed on its own ((x+y) % 10, or |x-y| for subtraction) with no carry or borrow passed on.
When the problem needs no carry that shortcut is the right answer, so the wrong answer is the
true one +/- 10 instead.
"""
from __future__ import annotations

import random
import re

from .common import Problem, Task, check_p_wrong, parse_int

_QUESTION_RE = re.compile(r"(\d+)([+-])(\d+)=\?")
MAX_DIGITS = 30


def _operands(problem: Problem) -> tuple[int, str, int]:
    m = _QUESTION_RE.fullmatch(problem.question)
    if m is None:
        raise ValueError(f"not an arithmetic question: {problem.question!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def _columns(a: int, b: int) -> list[tuple[int, int]]:
    """(digit of a, digit of b) per column, rightmost first, padded with zeros."""
    sa, sb = str(a), str(b)
    width = max(len(sa), len(sb))
    sa, sb = sa.zfill(width), sb.zfill(width)
    return [(int(x), int(y)) for x, y in zip(reversed(sa), reversed(sb))]


def needs_carry(problem: Problem) -> bool:
    """True if the column method needs a carry (addition) or a borrow (subtraction)."""
    a, op, b = _operands(problem)
    if op == "+":
        return any(x + y >= 10 for x, y in _columns(a, b))
    return any(x < y for x, y in _columns(a, b))


def carryless(a: int, op: str, b: int) -> int:
    """The carry-less shortcut: each column on its own, nothing carried or borrowed."""
    digits = [(x + y) % 10 if op == "+" else abs(x - y) for x, y in _columns(a, b)]
    return int("".join(str(d) for d in reversed(digits)))


def _carry_columns(a: int, op: str, b: int) -> list[int]:
    """Indices (rightmost = 0) of the columns that take a carry-in (addition) or a borrow-in
    (subtraction): the places where a writer in a hurry drops it."""
    out, carry = [], 0
    for i, (x, y) in enumerate(_columns(a, b)):
        if carry:
            out.append(i)
        carry = int(x + y + carry >= 10) if op == "+" else int(x - y - carry < 0)
    return out


def _column_trace(a: int, op: str, b: int, slip: int | None = None, caught: bool = False) -> tuple[str, int]:
    """The column method written out, and the value it arrives at. With `slip`, the carry/borrow into
    column `slip` is dropped there (and what follows is computed from the slipped column, so the
    trace stays self-consistent and ends at a wrong value); with `caught`, the writer notices right
    after the slipped column ("wait, check the carry: ..."), redoes it, and goes on correctly."""
    steps, carry, digits = [], 0, []
    for i, (x, y) in enumerate(_columns(a, b)):
        text, digit, carry_out = _column_step(x, op, y, carry)
        if i == slip:                               # the carry/borrow this column takes is dropped
            dropped = _column_step(x, op, y, 0)
            if caught:
                steps.append(dropped[0])
                text = f"wait, check the {'carry' if op == '+' else 'borrow'}: {text}"
            else:
                text, digit, carry_out = dropped
        steps.append(text)
        digits.append(digit)
        carry = carry_out
    if op == "+" and carry:
        digits.append(1)
    return ", ".join(steps), int("".join(str(d) for d in reversed(digits)))


def _column_step(x: int, op: str, y: int, carry: int) -> tuple[str, int, int]:
    """'x+y(+1)=t' / 'x-y(-1)(+10)=d', the digit written, the carry/borrow out."""
    if op == "+":
        total = x + y + carry
        return f"{x}+{y}{'+1' if carry else ''}={total}", total % 10, total // 10
    diff, text = x - y - carry, f"{x}-{y}{'-1' if carry else ''}"
    borrow = int(diff < 0)
    if borrow:
        diff, text = diff + 10, text + "+10"
    return f"{text}={diff}", diff, borrow


class Arithmetic(Task):
    """`a+b=?` / `a-b=?` with operand digit counts in [min_digits, max_digits]."""
    name = "arithmetic"

    def __init__(self, min_digits: int = 1, max_digits: int = 3, ops: str = "+"):
        if not isinstance(min_digits, int) or not 1 <= min_digits <= MAX_DIGITS:
            raise ValueError(f"min_digits must be an integer in [1, {MAX_DIGITS}], got {min_digits!r}")
        if not isinstance(max_digits, int) or not min_digits <= max_digits <= MAX_DIGITS:
            raise ValueError(f"max_digits must be an integer in [min_digits={min_digits}, {MAX_DIGITS}], "
                             f"got {max_digits!r}")
        if not isinstance(ops, str) or not ops or set(ops) - set("+-") or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be a non-empty subset of '+-' (e.g. '+', '-', '+-'), got {ops!r}")
        self.min_digits, self.max_digits, self.ops = min_digits, max_digits, ops

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        lo = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(lo, 10 ** digits - 1)

    def sample(self, rng: random.Random) -> Problem:
        op = rng.choice(self.ops)
        a, b = self._operand(rng), self._operand(rng)
        if op == "-" and a < b:
            a, b = b, a
        value = a + b if op == "+" else a - b
        return Problem(self.name, f"{a}{op}{b}=?", str(value), {"a": a, "b": b, "op": op})

    def check(self, answer: str | None, problem: Problem) -> bool:
        got, want = parse_int(answer), parse_int(problem.answer)
        return got is not None and got == want

    def worked_solution(self, problem: Problem) -> str:
        a, op, b = _operands(problem)
        trace, value = _column_trace(a, op, b)
        assert value == (a + b if op == "+" else a - b)
        return f"<think>{trace}, so {value}</think><answer>{value}</answer>"

    def slipped_solution(self, problem: Problem, rng: random.Random, caught: bool) -> str | None:
        """A worked trace with the writer's habitual slip: the carry/borrow into the leading column is
        dropped. Wrong unless `caught`, where the writer notices at once and repairs it. None when
        nothing is carried into the leading column. (A habit, not a random slip: a model that learns it
        cannot fix it by sampling more carefully, only by noticing - or by unlearning the habit.)"""
        a, op, b = _operands(problem)
        places = _carry_columns(a, op, b)
        if not places or places[-1] != len(_columns(a, b)) - 1:
            return None
        trace, value = _column_trace(a, op, b, slip=places[-1], caught=caught)
        return f"<think>{trace}, so {value}</think><answer>{value}</answer>"

    def direct_solution(self, problem: Problem, rng: random.Random, p_wrong: float = 0.0) -> str:
        check_p_wrong(p_wrong)
        a, op, b = _operands(problem)
        value = a + b if op == "+" else a - b
        if rng.random() < p_wrong:
            wrong = carryless(a, op, b)
            if wrong == value:
                wrong = value + 10 if value < 10 or rng.random() < 0.5 else value - 10
            value = wrong
        return f"<answer>{value}</answer>"
