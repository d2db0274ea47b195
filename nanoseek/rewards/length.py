"""DAPO's soft overlong punishment: a length penalty that ramps in before the hard cut-off.

A completion truncated at the generation limit gets no answer and reward 0, the same as a short
wrong one, so the policy never learns that "too long" was the problem. DAPO (sec. 3.4) adds

    R_len(L) = 0                            if L <= max_len - cache_len
             = ((max_len - cache_len) - L) / cache_len   inside the last cache_len tokens
             = -1                           if L > max_len

on top of the accuracy reward (DAPO used max_len 20480, cache_len 4096). Lengths are token
counts, which only the caller knows, so they arrive as the `completion_lengths` keyword; leaving
them out is a wiring bug, and `combine()` lets that error through rather than scoring it 0.
"""
from __future__ import annotations

from nanoseek.data.tasks import Problem

from .combine import RewardInputError


def soft_overlong_punishment(max_len: int, cache_len: int):
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer (tokens), got {max_len!r}")
    if not isinstance(cache_len, int) or not 1 <= cache_len <= max_len:
        raise ValueError(f"cache_len must be an integer in [1, max_len={max_len}], got {cache_len!r}")
    free = max_len - cache_len

    def soft_overlong_punishment(prompts: list[str], completions: list[str], problems: list[Problem],
                                 completion_lengths: list[int] | None = None, **kw) -> list[float]:
        if completion_lengths is None:
            raise RewardInputError("soft_overlong_punishment needs completion_lengths=[token count per "
                                   "completion]; pass it to the reward call")
        if len(completion_lengths) != len(completions):
            raise RewardInputError(f"soft_overlong_punishment got {len(completion_lengths)} completion_lengths "
                                   f"for {len(completions)} completions")
        out = []
        for n in completion_lengths:
            if n <= free:
                out.append(0.0)
            elif n <= max_len:
                out.append((free - n) / cache_len)
            else:
                out.append(-1.0)
        return out

    return soft_overlong_punishment
