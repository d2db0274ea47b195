"""Rule-based rewards for GRPO: accuracy, format, language consistency, overlong shaping, and combine().

A reward is a plain function `fn(prompts, completions, problems, **kw) -> list[float]`, one score
per completion; `combine` makes a weighted sum of several that survives a component crashing on
odd output. `build_reward("accuracy:1.0,format:0.2")` is the string form the CLI uses. The
length penalty needs numbers (max_len, cache_len), so it is built in code, not named here.
"""
from __future__ import annotations

import math

from .accuracy import accuracy_reward, countdown_reward
from .combine import CombinedReward, RewardInputError, RewardScores, combine
from .format import format_reward, tag_count_reward
from .language import language_consistency_reward
from .length import soft_overlong_punishment

REWARDS = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "tag_count": tag_count_reward,
    "language": language_consistency_reward(),
    "countdown": countdown_reward(),
}


def build_reward(spec: str, timeout_s: float | None = None) -> CombinedReward:
    """"name:weight,name:weight" (a bare name means weight 1.0) -> combined reward."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must look like 'accuracy:1.0,format:0.2', got {spec!r}")
    pairs, names = [], []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty entry in reward spec {spec!r}")
        name, colon, weight_text = part.partition(":")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in spec {spec!r}; known rewards: {', '.join(REWARDS)}")
        if name in names:
            raise ValueError(f"reward {name!r} appears twice in spec {spec!r}")
        try:
            weight = float(weight_text) if colon else 1.0
        except ValueError:
            raise ValueError(f"weight of reward {name!r} must be a number, got {weight_text!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"weight of reward {name!r} must be finite, got {weight_text!r}")
        pairs.append((REWARDS[name], weight))
        names.append(name)
    return combine(pairs, names, timeout_s)


__all__ = ["REWARDS", "build_reward", "combine", "CombinedReward", "RewardInputError", "RewardScores", "accuracy_reward",
           "countdown_reward", "format_reward", "tag_count_reward", "language_consistency_reward",
           "soft_overlong_punishment"]
