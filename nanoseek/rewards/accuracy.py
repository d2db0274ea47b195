"""Accuracy: does the task's own checker accept the extracted answer (R1-Zero's main reward).

Only the last <answer> block is graded (`extract_answer`); the reasoning earns nothing here.
`problem.task` picks the checker through `nanoseek.data.tasks.get_checker`: a registered task's
`check`, or math_verify equivalence for JSONL problems. Checkers are built once per task name per
call, not cached across calls, so nothing outlives a batch.

`countdown_reward` keeps TinyZero's shaping as an option: 1.0 for a correct expression, a small
`format_score` for an answer that is present but wrong (wrong numbers, unparsable, off target),
0.0 when there is no answer block at all.
"""
from __future__ import annotations

from nanoseek.data.tasks import Countdown, Problem, extract_answer, get_checker


def accuracy_reward(prompts: list[str], completions: list[str], problems: list[Problem], **kw) -> list[float]:
    if len(completions) != len(problems):
        raise ValueError(f"accuracy_reward got {len(completions)} completions for {len(problems)} problems")
    checkers = {}
    out = []
    for completion, problem in zip(completions, problems):
        if problem.task not in checkers:
            checkers[problem.task] = get_checker(problem.task)
        out.append(1.0 if checkers[problem.task](extract_answer(completion), problem) else 0.0)
    return out


def countdown_reward(format_score: float = 0.1):
    """TinyZero's countdown reward: 1.0 / format_score / 0.0. Grades every problem as countdown."""
    if not isinstance(format_score, (int, float)) or not 0.0 <= format_score <= 1.0:
        raise ValueError(f"format_score must be in [0, 1], got {format_score!r}")
    task = Countdown()

    def countdown_reward(prompts: list[str], completions: list[str], problems: list[Problem], **kw) -> list[float]:
        if len(completions) != len(problems):
            raise ValueError(f"countdown_reward got {len(completions)} completions for {len(problems)} problems")
        out = []
        for completion, problem in zip(completions, problems):
            answer = extract_answer(completion)
            if answer is None:
                out.append(0.0)
            else:
                out.append(1.0 if task.check(answer, problem) else float(format_score))
        return out

    return countdown_reward
