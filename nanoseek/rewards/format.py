"""Format rewards: is the completion shaped <think>...</think><answer>...</answer>?

`format_reward` is R1-Zero's all-or-nothing format check (`is_well_formatted`: one think block,
one non-empty answer block, nothing else but whitespace). `tag_count_reward` is open-r1's dense
version, which gives a policy that has half the format something to climb: 0.25 for each of the
four tags that appears exactly once and after every other exactly-once tag that should precede
it. open-r1 also demands newlines around the tags; our format does not.
"""
from __future__ import annotations

from nanoseek.data.tasks import Problem, is_well_formatted

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(prompts: list[str], completions: list[str], problems: list[Problem], **kw) -> list[float]:
    return [1.0 if is_well_formatted(c) else 0.0 for c in completions]


def _tag_score(completion: str) -> float:
    if not isinstance(completion, str):
        return 0.0
    once = {tag: completion.find(tag) for tag in TAGS if completion.count(tag) == 1}
    score = 0.0
    for k, tag in enumerate(TAGS):
        if tag in once and all(once[prev] < once[tag] for prev in TAGS[:k] if prev in once):
            score += 0.25
    return score


def tag_count_reward(prompts: list[str], completions: list[str], problems: list[Problem], **kw) -> list[float]:
    return [_tag_score(c) for c in completions]
