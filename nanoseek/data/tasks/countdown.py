"""Countdown (TinyZero's R1-Zero testbed): combine all given numbers with + - * / to hit a target.

    Use 25 7 3 4 to make 58   ->   (25-7)*3+4

Generation builds a random expression tree over ALL the numbers in which every intermediate
result is a positive integer, and rejects targets outside [1, max_target]; so every problem has
a solution whose trace reads like arithmetic a child could check.

Checking never calls Python's eval. `parse_expression` is a tokenizer plus a recursive-descent
parser over non-negative integer literals, + - * /, and parentheses (no unary minus, no `**`, no
names), with limits on length and nesting so hostile input cannot hang or blow the stack. The
tree is evaluated with `fractions.Fraction`, so 7/2*2 is exactly 7, and the answer counts only if
it uses each given number exactly once (multiset equality) and equals the target.

The worked solution is a depth-first search written out: failed attempts (one per first move,
the closest miss, each compared with the target: "7+4=11, 11+3=14 vs 19 no."; at most
MAX_SHOWN_FAILURES), then the path that works ("... vs 19 yes.") and its expression. It is a
deterministic function of the problem. Unlike TinyZero we do not give partial credit here; the
0.1 "format score" lives in `nanoseek.rewards.accuracy.countdown_reward`.
"""
from __future__ import annotations

import random
import re
from collections import Counter
from fractions import Fraction

from .common import Problem, Task, check_p_wrong

MAX_EXPR_CHARS = 200
MAX_DEPTH = 32
MAX_SHOWN_FAILURES = 11
MAX_NUMBERS = 5                 # an unsolvable 5-number search takes ~1 s in pure Python, 6 takes ~40 s
_QUESTION_RE = re.compile(r"Use ([0-9]+(?: [0-9]+)*) to make ([0-9]+)")
_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|([-+*/()]))")
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


# ---- safe parser ---------------------------------------------------------------------------

def parse_expression(text: str):
    """Parse into a tree: int leaf, or (op, left, right). Raises ValueError on anything else."""
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected character {text[pos:].lstrip()[:1]!r}")
        tokens.append(int(m.group(1)) if m.group(1) is not None else m.group(2))
        pos = m.end()
    if not tokens:
        raise ValueError("empty expression")
    i = 0

    def peek():
        return tokens[i] if i < len(tokens) else None

    def expr(depth):
        nonlocal i
        node = term(depth)
        while peek() in ("+", "-"):
            op = tokens[i]
            i += 1
            node = (op, node, term(depth))
        return node

    def term(depth):
        nonlocal i
        node = factor(depth)
        while peek() in ("*", "/"):
            op = tokens[i]
            i += 1
            node = (op, node, factor(depth))
        return node

    def factor(depth):
        nonlocal i
        tok = peek()
        if isinstance(tok, int):
            i += 1
            return tok
        if tok == "(":
            if depth >= MAX_DEPTH:
                raise ValueError(f"parentheses nested deeper than {MAX_DEPTH}")
            i += 1
            node = expr(depth + 1)
            if peek() != ")":
                raise ValueError("unbalanced parentheses")
            i += 1
            return node
        raise ValueError(f"expected a number or '(' but found {tok!r}")

    tree = expr(0)
    if i != len(tokens):
        raise ValueError(f"unexpected {tokens[i]!r} after a complete expression")
    return tree


def leaves(tree) -> list[int]:
    return [tree] if isinstance(tree, int) else leaves(tree[1]) + leaves(tree[2])


def evaluate(tree) -> Fraction:
    """Exact value; ZeroDivisionError on division by zero."""
    if isinstance(tree, int):
        return Fraction(tree)
    op, a, b = tree[0], evaluate(tree[1]), evaluate(tree[2])
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a / b


# ---- solver --------------------------------------------------------------------------------

def _join(a, op, b):
    """Combine two (value, text, precedence) items with the fewest parentheses that keep the value."""
    (va, ta, pa), (vb, tb, pb) = a, b
    prec = _PREC[op]
    if pa < prec:
        ta = f"({ta})"
    if pb < prec or (op in "-/" and pb == prec):
        tb = f"({tb})"
    value = {"+": va + vb, "-": va - vb, "*": va * vb}[op] if op != "/" else va / vb
    return value, f"{ta}{op}{tb}", prec


def _moves(items, integers_only):
    """All (i, j, op) merges of two items, in a fixed order; a over b with the larger first."""
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            big, small = (i, j) if items[i][0] >= items[j][0] else (j, i)
            vb, vs = items[big][0], items[small][0]
            yield big, small, "+"
            yield big, small, "*"
            if not integers_only or vb > vs:
                yield big, small, "-"
            if not integers_only:
                yield small, big, "-"
            if vs != 0 and (not integers_only or vb % vs == 0):
                yield big, small, "/"
            if not integers_only and vb != 0:
                yield small, big, "/"


def _search(nums, target, integers_only, failures):
    """DFS over merges. Returns (steps, expression) or None; appends (failed leaf path, its value) to
    failures."""
    target = Fraction(target)
    dead = set()

    def dfs(items, steps):
        if len(items) == 1:
            if items[0][0] == target:
                return steps, items[0][1]
            failures.append((steps, items[0][0]))
            return None
        key = tuple(sorted(v for v, _, _ in items))
        if key in dead:
            return None
        for i, j, op in _moves(items, integers_only):
            merged = _join(items[i], op, items[j])
            step = f"{_num(items[i][0])}{op}{_num(items[j][0])}={_num(merged[0])}"
            rest = [it for k, it in enumerate(items) if k not in (i, j)]
            found = dfs(rest + [merged], steps + [step])
            if found:
                return found
        dead.add(key)
        return None

    return dfs([(Fraction(n), str(n), 3) for n in nums], [])


def _num(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"({x})"


def _check_count(nums) -> None:
    if not nums or len(nums) > MAX_NUMBERS:
        raise ValueError(f"the countdown solver takes 1 to {MAX_NUMBERS} numbers, got {len(nums)}")


def solve(nums: list[int], target: int) -> str | None:
    """An expression using every number once that equals target, or None. Tries positive-integer
    intermediates first (readable), then any rational ones."""
    _check_count(nums)
    for integers_only in (True, False):
        found = _search(nums, target, integers_only, [])
        if found:
            return found[1]
    return None


# ---- the task ------------------------------------------------------------------------------

def _numbers_and_target(problem: Problem) -> tuple[list[int], int] | None:
    nums, target = problem.meta.get("numbers"), problem.meta.get("target")
    if (isinstance(nums, list) and nums and all(type(n) is int for n in nums) and type(target) is int):
        return nums, target
    m = _QUESTION_RE.search(problem.question)
    if m is None:
        return None
    return [int(t) for t in m.group(1).split()], int(m.group(2))


def _random_tree(nums, rng, ops):
    """A random expression over all nums as a (value, text, precedence) item, or None if a
    division by zero or a non-positive/fractional intermediate came up where `ops` forbids it."""
    items = [(Fraction(n), str(n), 3) for n in nums]
    rng.shuffle(items)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        op = rng.choice(ops)
        a, b = items[i], items[j]
        if op == "/" and (b[0] == 0 or a[0] % b[0] != 0):
            return None
        merged = _join(a, op, b)
        if merged[0] <= 0:
            return None
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [merged]
    return items[0]


class Countdown(Task):
    """Reach a target in [1, max_target] from n_numbers numbers in [1, max_number]."""
    name = "countdown"

    def __init__(self, n_numbers: int | tuple[int, int] = (3, 4), max_number: int = 50, max_target: int = 200):
        pair = (n_numbers, n_numbers) if isinstance(n_numbers, int) else n_numbers
        lo, hi = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
        if not (isinstance(lo, int) and isinstance(hi, int) and 2 <= lo <= hi <= MAX_NUMBERS):
            raise ValueError(f"n_numbers must be an int or a (lo, hi) pair with 2 <= lo <= hi <= {MAX_NUMBERS}, "
                             f"got {n_numbers!r}")
        if not isinstance(max_number, int) or not 2 <= max_number <= 10_000:
            raise ValueError(f"max_number must be an integer in [2, 10000], got {max_number!r}")
        if not isinstance(max_target, int) or not 1 <= max_target <= 1_000_000:
            raise ValueError(f"max_target must be an integer in [1, 1000000], got {max_target!r}")
        self.n_range, self.max_number, self.max_target = (lo, hi), max_number, max_target

    def sample(self, rng: random.Random) -> Problem:
        for _ in range(100_000):
            nums = [rng.randint(1, self.max_number) for _ in range(rng.randint(*self.n_range))]
            tree = _random_tree(nums, rng, "+-*/")
            if tree is not None and tree[0] <= self.max_target:
                target = int(tree[0])
                question = f"Use {' '.join(map(str, nums))} to make {target}"
                return Problem(self.name, question, tree[1], {"numbers": nums, "target": target})
        raise ValueError(f"countdown: no target in [1, max_target={self.max_target}] found; raise max_target")

    def check(self, answer: str | None, problem: Problem) -> bool:
        spec = _numbers_and_target(problem)
        if not isinstance(answer, str) or spec is None:
            return False
        nums, target = spec
        try:
            tree = parse_expression(answer)
            if Counter(leaves(tree)) != Counter(nums):
                return False
            return evaluate(tree) == target
        except (ValueError, ZeroDivisionError):
            return False

    def worked_solution(self, problem: Problem) -> str:
        spec = _numbers_and_target(problem)
        if spec is None:
            raise ValueError(f"not a countdown question: {problem.question!r}")
        nums, target = spec
        _check_count(nums)
        for integers_only in (True, False):
            failures: list[list[str]] = []
            found = _search(nums, target, integers_only, failures)
            if found:
                break
        else:
            raise ValueError(f"countdown problem has no solution: {problem.question!r}")
        steps, expr = found
        # one miss per first move tried before the one that works: the closest to the target (so the
        # trace teaches a search that picks the best last step; for 3 numbers that search is complete)
        best: dict[str, tuple] = {}          # first move -> (miss, path), in the order the search met them
        for path, value in failures:
            miss = abs(value - target)
            if path and path[0] != steps[0] and (path[0] not in best or miss < best[path[0]][0]):
                best[path[0]] = (miss, path)
        shown = [", ".join(path) + f" vs {target} no." for _, path in list(best.values())[:MAX_SHOWN_FAILURES]]
        trace = " ".join(shown + [", ".join(steps) + f" vs {target} yes.", f"{expr}={target}"])
        return f"<think>{trace}</think><answer>{expr}</answer>"

    def direct_solution(self, problem: Problem, rng: random.Random, p_wrong: float = 0.0) -> str:
        check_p_wrong(p_wrong)
        spec = _numbers_and_target(problem)
        if spec is None:
            raise ValueError(f"not a countdown question: {problem.question!r}")
        nums, target = spec
        if rng.random() >= p_wrong:
            expr = solve(nums, target)
            if expr is None:
                raise ValueError(f"countdown problem has no solution: {problem.question!r}")
            return f"<answer>{expr}</answer>"
        # plausible wrong: a random all-numbers expression that misses the target
        for _ in range(20):
            tree = _random_tree(nums, rng, "+-*")
            if tree is not None and tree[0] != target:
                return f"<answer>{tree[1]}</answer>"
        # the plain sum and "sum but subtract the last" differ by 2*last, so one of them misses
        plain = "+".join(map(str, nums))
        if sum(nums) != target:
            return f"<answer>{plain}</answer>"
        return f"<answer>{'+'.join(map(str, nums[:-1]))}-{nums[-1]}</answer>"
