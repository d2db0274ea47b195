"""combine(): several reward functions as one weighted sum that cannot take the run down.

Every reward has the signature `fn(prompts, completions, problems, **kw) -> list[float]`; `kw`
may carry per-sample lists (`completion_lengths`, `truncated`) that line up with `completions`.

A GRPO run scores millions of completions written by a policy that is still learning, so some of
them will break some reward (a regex on pathological text, math_verify on a 10k-digit number). A
crash there would lose hours, and a silent 0 would hide a real bug. So: when a component raises
on a batch it is re-run sample by sample; a sample that still raises, or a value that is None,
NaN, infinite or not a number, scores 0.0 for that component, and a warning naming the component,
the exception and a shortened copy of the completion goes to stderr once per (component, kind of
failure) per combined reward. `RewardInputError` (the caller forgot an input the reward needs)
is a wiring bug, not a bad sample, and is raised as is.

The unweighted per-component scores of the last call stay on the object (`last_components`) for
logging; the state lives on the instance, never in the module.
"""
from __future__ import annotations

import math
import sys
from typing import Callable

RewardFn = Callable[..., list]
SHOWN_CHARS = 200


class RewardInputError(ValueError):
    """A reward was called without something it needs (e.g. completion_lengths)."""


def _shorten(text, limit: int = SHOWN_CHARS) -> str:
    text = repr(text) if not isinstance(text, str) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CombinedReward:
    def __init__(self, rewards: list[tuple[RewardFn, float]], names: list[str]):
        self.fns = [fn for fn, _ in rewards]
        self.weights = [float(w) for _, w in rewards]
        self.names = names
        self.last_components: dict[str, list[float]] = {}
        self._warned: set[tuple[str, str]] = set()

    def _warn(self, name: str, kind: str, detail: str, completion) -> None:
        if (name, kind) in self._warned:
            return
        self._warned.add((name, kind))
        print(f"warning: reward {name!r} {detail} on completion {_shorten(completion)!r}; scored 0.0 "
              f"(further {kind} from {name!r} are not reported)", file=sys.stderr)

    def _clean(self, name: str, value, completion) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self._warn(name, "non-numeric values", f"returned {value!r}, not a number", completion)
            return 0.0
        if not math.isfinite(x):
            self._warn(name, "non-finite values", f"returned {x}", completion)
            return 0.0
        return x

    @staticmethod
    def _run(fn, prompts, completions, problems, kw) -> list:
        values = list(fn(prompts, completions, problems, **kw))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
        return values

    def _component(self, name, fn, prompts, completions, problems, kw) -> list[float]:
        n = len(completions)
        try:
            values = self._run(fn, prompts, completions, problems, kw)
        except RewardInputError:
            raise
        except Exception:
            values = []
            for i in range(n):
                kw_i = {k: v[i:i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v for k, v in kw.items()}
                try:
                    values.append(self._run(fn, prompts[i:i + 1], completions[i:i + 1],
                                            problems[i:i + 1], kw_i)[0])
                except RewardInputError:
                    raise
                except Exception as e:
                    self._warn(name, type(e).__name__, f"raised {type(e).__name__}: {_shorten(str(e))}", completions[i])
                    values.append(0.0)
        return [self._clean(name, v, c) for v, c in zip(values, completions)]

    def __call__(self, prompts: list[str], completions: list[str], problems: list, **kw) -> list[float]:
        n = len(completions)
        if len(prompts) != n or len(problems) != n:
            raise ValueError(f"reward called with {len(prompts)} prompts, {n} completions, {len(problems)} problems")
        components = {name: self._component(name, fn, list(prompts), list(completions), list(problems), kw)
                      for name, fn in zip(self.names, self.fns)}
        self.last_components = components
        return [sum(w * components[name][i] for name, w in zip(self.names, self.weights)) for i in range(n)]

    def __repr__(self) -> str:
        return "combine(" + ", ".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights)) + ")"


def combine(rewards: list[tuple[RewardFn, float]], names: list[str] | None = None) -> CombinedReward:
    if not rewards:
        raise ValueError("combine() needs at least one (reward_fn, weight) pair")
    for item in rewards:
        if not (isinstance(item, tuple) and len(item) == 2 and callable(item[0])):
            raise ValueError(f"combine() takes (reward_fn, weight) pairs, got {item!r}")
        if isinstance(item[1], bool) or not isinstance(item[1], (int, float)) or not math.isfinite(item[1]):
            raise ValueError(f"reward weight must be a finite number, got {item[1]!r}")
    if names is None:
        names = []
        for fn, _ in rewards:
            base = getattr(fn, "__name__", type(fn).__name__)
            name, k = base, 2
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
    names = list(names)
    if len(names) != len(rewards):
        raise ValueError(f"combine() got {len(names)} names for {len(rewards)} rewards")
    if len(set(names)) != len(names):
        raise ValueError(f"combine() names must be unique, got {names}")
    return CombinedReward(list(rewards), names)
