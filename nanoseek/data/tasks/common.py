"""What every verifiable task shares: the Problem record, the completion format, the Task contract.

R1-Zero learns from rule-checked answers only, so a task is a generator *and* the checker that
grades it, kept side by side so they cannot drift apart. A model completion looks like

    <think>REASONING</think><answer>ANSWER</answer>      (worked style)
    <answer>ANSWER</answer>                              (direct style)

and every checker sees only the text inside the last `<answer>` block (`extract_answer`), never
the reasoning. Checkers must return False on garbage instead of raising: they run on whatever a
half-trained policy emits.

Splits. `Task.problems(n, seed, split)` sends each question to "train" or "test" by a stable hash
of its text (sha256, not Python's salted `hash()`), then reject-samples the train distribution
until it has `n` problems of the asked split. A test question is therefore never a train
question, whatever the seeds, and evaluation measures generalisation, not recall.
"""
from __future__ import annotations

import hashlib
import random
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

SPLITS = ("train", "test")
TEST_FRACTION_PER_MILLE = 100          # 10% of the question space is held out for "test"

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer. `meta` holds what the checker or solver needs
    (operands, numbers, target); it stays out of equality and hashing, and holds only
    JSON-friendly values (lists, not tuples) so `to_dict`/`from_dict` round-trip exactly."""
    task: str
    question: str
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        return {"task": self.task, "question": self.question, "answer": self.answer, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: dict) -> Problem:
        if not isinstance(d, dict):
            raise ValueError(f"Problem.from_dict expects a dict, got {type(d).__name__}")
        for key in ("task", "question", "answer"):
            if not isinstance(d.get(key), str):
                raise ValueError(f"Problem.from_dict: field {key!r} must be a string, got {d.get(key)!r}")
        meta = d.get("meta", {})
        if not isinstance(meta, dict):
            raise ValueError(f"Problem.from_dict: field 'meta' must be a dict, got {type(meta).__name__}")
        return cls(d["task"], d["question"], d["answer"], dict(meta))


def extract_answer(completion: str) -> str | None:
    """Stripped text of the last complete <answer>...</answer> block, or None."""
    if not isinstance(completion, str):
        return None
    close = completion.rfind("</answer>")
    if close < 0:
        return None
    # the opening tag nearest to the last closing tag, so "<answer>a<answer>b</answer>" gives "b"
    open_ = completion.rfind("<answer>", 0, close)
    if open_ < 0:
        return None
    return completion[open_ + len("<answer>"):close].strip()


def extract_think(completion: str) -> str | None:
    """Stripped text of the first <think>...</think> block, or None."""
    if not isinstance(completion, str):
        return None
    m = _THINK_RE.search(completion)
    return m.group(1).strip() if m else None


def is_well_formatted(completion: str) -> bool:
    """Exactly one think block then one non-empty answer block, only whitespace around them. Linear
    time: the equivalent regex (`\\s*<think>(.*?)</think>\\s*<answer>(.*?)</answer>\\s*` with no tag inside)
    backtracks quadratically on completions with many tags (10 s on 160k characters)."""
    if not isinstance(completion, str):
        return False
    s = completion.strip()
    if not (s.startswith("<think>") and s.endswith("</answer>")):
        return False
    if any(s.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return False
    end_think, start_answer = s.find("</think>"), s.find("<answer>")
    if end_think > start_answer or s[end_think + len("</think>"):start_answer].strip():
        return False
    return bool(s[start_answer + len("<answer>"):-len("</answer>")].strip())


def split_of(question: str) -> str:
    """"train" or "test", decided by a stable hash of the question text alone."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 1000 < TEST_FRACTION_PER_MILLE else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got split={split!r}")


def check_p_wrong(p_wrong: float) -> None:
    if not (isinstance(p_wrong, (int, float)) and 0.0 <= p_wrong <= 1.0):
        raise ValueError(f"p_wrong must be a probability in [0, 1], got {p_wrong!r}")


def parse_int(text: str | None, max_chars: int = 64) -> int | None:
    """An optionally signed ASCII integer ('+5', '-3', ' 12 '), or None for anything else."""
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    m = re.fullmatch(r"\s*([+-]?)\s*([0-9]+)\s*", text)
    if m is None:
        return None
    value = int(m.group(2))
    return -value if m.group(1) == "-" else value


class Task(ABC):
    """A verifiable task: a train distribution (`sample`), a checker, and two ways to answer.

    Subclasses take their difficulty knobs as constructor arguments and validate them. The
    checker must not depend on the knobs: `get_task(problem.task).check(...)` with default knobs
    grades any problem of that task.
    """
    name: str = ""

    @abstractmethod
    def sample(self, rng: random.Random) -> Problem:
        """One problem from the (unsplit) distribution."""

    @abstractmethod
    def check(self, answer: str | None, problem: Problem) -> bool:
        """True iff `answer` (the extracted answer text) solves `problem`; never raises."""

    @abstractmethod
    def worked_solution(self, problem: Problem) -> str:
        """A correct completion in worked style: <think>...</think><answer>...</answer>."""

    @abstractmethod
    def direct_solution(self, problem: Problem, rng: random.Random, p_wrong: float = 0.0) -> str:
        """<answer>X</answer>, where X is a plausible wrong answer with probability p_wrong."""

    def guessed_solution(self, problem: Problem, rng: random.Random, p_wrong: float = 0.0,
                         recheck: bool = True) -> str:
        """A quick answer first (a direct answer: plausibly wrong with probability p_wrong), then either
        a re-evaluation that works it out properly, or nothing more:

            recheck  <think>522? wait, check: 7+5=12, 4+8+1=13, 3+2+1=6, so 632</think><answer>632</answer>
            not      <think>522</think><answer>522</answer>
        """
        guess = extract_answer(self.direct_solution(problem, rng, p_wrong))
        if not recheck:
            return f"<think>{guess}</think><answer>{guess}</answer>"
        return self.worked_solution(problem).replace("<think>", f"<think>{guess}? wait, check: ", 1)

    def slipped_solution(self, problem: Problem, rng: random.Random, caught: bool) -> str | None:
        """A worked completion with one slip in it: it ends wrong unless `caught`, where the writer
        notices ("wait, check ...") and repairs it. None if the task (or this problem) has no
        natural slip; the corpus then writes the plain worked solution."""
        return None

    def problems(self, n: int, seed: int, split: str = "train") -> list[Problem]:
        check_split(split)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[Problem] = []
        max_tries = 1000 * (n + 1)
        for _ in range(max_tries):
            if len(out) == n:
                return out
            p = self.sample(rng)
            if split_of(p.question) == split:
                out.append(p)
        if len(out) == n:
            return out
        raise ValueError(f"{self.name}: could not draw {n} {split!r} problems in {max_tries} tries; "
                         f"the question space is too small for a {split} split, widen the knobs")
