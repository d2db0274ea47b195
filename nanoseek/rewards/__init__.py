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


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def import_reward(module: str, function: str):
    """A user's reward function `fn(prompts, completions, problems, **kw) -> list[float]` by import path."""
    import importlib
    try:
        fn = getattr(importlib.import_module(module), function)
    except ImportError as e:
        raise ValueError(f"reward {module}:{function}: cannot import {module!r} ({e}); is it on PYTHONPATH?") from None
    except AttributeError:
        raise ValueError(f"reward {module}:{function}: module {module!r} has no {function!r}") from None
    if not callable(fn):
        raise ValueError(f"reward {module}:{function} is a {type(fn).__name__}, not a function")
    return fn


def build_reward(spec: str, timeout_s: float | None = None) -> CombinedReward:
    """"name:weight,name:weight" (a bare name means weight 1.0; a name may also be your own function as
    module.path:function, e.g. "accuracy:1,mypkg.rewards:brevity:0.1") -> combined reward."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must look like 'accuracy:1.0,format:0.2', got {spec!r}")
    pairs, names = [], []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty entry in reward spec {spec!r}")
        fields = [f.strip() for f in part.split(":")]
        if len(fields) == 3 or (len(fields) == 2 and fields[0] not in REWARDS and not _is_number(fields[1])):
            # module:function[:weight]
            fn, name = import_reward(fields[0], fields[1]), fields[1]
            weight_text = fields[2] if len(fields) == 3 else "1"
        else:
            name, weight_text = fields[0], fields[1] if len(fields) == 2 else "1"
            if name not in REWARDS:
                raise ValueError(f"unknown reward {name!r} in spec {spec!r}; known rewards: {', '.join(REWARDS)} "
                                 "(or your own as module.path:function[:weight])")
            fn = REWARDS[name]
        if name in names:
            raise ValueError(f"reward {name!r} appears twice in spec {spec!r}")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"weight of reward {name!r} must be a number, got {weight_text!r}") from None
        if not math.isfinite(weight):
            raise ValueError(f"weight of reward {name!r} must be finite, got {weight_text!r}")
        pairs.append((fn, weight))
        names.append(name)
    return combine(pairs, names, timeout_s)


__all__ = ["REWARDS", "build_reward", "combine", "CombinedReward", "RewardInputError", "RewardScores",
           "accuracy_reward",
           "countdown_reward", "format_reward", "tag_count_reward", "language_consistency_reward",
           "soft_overlong_punishment"]
