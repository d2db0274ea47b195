"""combine(): several reward functions as one weighted sum that cannot take the run down.

Every reward has the signature `fn(prompts, completions, problems, **kw) -> list[float]`; `kw`
may carry per-sample lists (`completion_lengths`, `truncated`) that line up with `completions`.

A GRPO run scores millions of completions written by a policy that is still learning, so some of
them will break some reward (a regex on pathological text, math_verify on a 10k-digit number). A
crash there would lose hours, a hang would stall the run, and a silent 0 would hide a real bug. So:

- with a time budget (`timeout_s`, `nanoseek grpo --reward-timeout`), the reward functions run in a
  forked worker process; a call that overruns is abandoned (the worker is killed and replaced);
- when a component raises on a batch or overruns, it is re-run sample by sample (each with the
  budget); a sample that still raises or overruns, or a value that is None, NaN, infinite or not a
  number, is a *failure* of that component for that sample;
- `score()` returns the weighted totals, the per-component scores, which samples failed and how many
  failures each component had (for the metrics); a failed sample's total is NaN, which GRPO leaves
  out of its group's baseline (as TRL does with rewards that return None);
- a warning naming the component, the failure and a shortened copy of the completion goes to stderr
  once per (component, kind of failure) per combined reward. `RewardInputError` (the caller forgot
  an input the reward needs) is a wiring bug, not a bad sample, and is raised as is.

`reward(prompts, completions, problems)` (calling the object) returns the totals with a failed component
counted as 0.0.
"""
from __future__ import annotations

import math
import multiprocessing
import pickle
import sys
from dataclasses import dataclass, field
from typing import Callable

RewardFn = Callable[..., list]
SHOWN_CHARS = 200
_FAILED = object()          # a sample on which a component raised or overran (already warned about)


class RewardInputError(ValueError):
    """A reward was called without something it needs (e.g. completion_lengths)."""


def _shorten(text, limit: int = SHOWN_CHARS) -> str:
    text = repr(text) if not isinstance(text, str) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class RewardScores:
    total: list[float]                       # weighted sum per sample; NaN where a component failed
    components: dict[str, list[float]]       # unweighted scores per component (0.0 where it failed)
    failed: list[bool]                       # per sample: did any component fail?
    failures: dict[str, int] = field(default_factory=dict)   # per component: samples it failed on


class _Timeout(Exception):
    pass


class WorkerInputError(RewardInputError):
    """The inputs of a reward cannot be pickled to the worker: a setup problem, not a bad sample."""


class _RemoteError(Exception):
    """An exception the reward raised in the worker, carried back as its type name and message."""

    def __init__(self, kind: str, msg: str):
        super().__init__(f"{kind}: {msg}")
        self.kind = kind


def _serve(fns, conn) -> None:
    """The worker's loop: run fns[k](*args, **kw), send back ("ok", values) or ("error", ...)."""
    while True:
        try:
            k, args, kw = conn.recv()
        except (EOFError, OSError):
            return
        try:
            conn.send(("ok", list(fns[k](*args, **kw))))
        except BaseException as e:   # sent back as text (exceptions need not pickle); SystemExit included
            conn.send(("error", (type(e).__name__, str(e)[:1000], isinstance(e, RewardInputError))))


class _Worker:
    """A forked process holding the reward functions (inherited, never pickled); killed and replaced
    when a call overruns its budget, since neither a thread nor a signal can stop a regex in C."""

    def __init__(self, fns):
        self.fns, self.proc = fns, None

    def _start(self):
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(self.fns, child), daemon=True)
        self.proc.start()
        child.close()

    def call(self, k: int, args, kw, timeout: float) -> list:
        if self.proc is None or not self.proc.is_alive():
            self._start()
        try:
            self.conn.send((k, args, kw))
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise WorkerInputError(f"the reward inputs cannot be sent to the reward worker ({e}); run rewards in "
                                   "this process with --reward-timeout 0") from None
        except OSError:                       # the worker died (a reward called os._exit, a segfault...)
            self.close()
            raise _RemoteError("WorkerDied", "the reward worker exited") from None
        try:
            if not self.conn.poll(timeout):
                self.close()
                raise _Timeout(f"took more than {timeout:g} s")
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            code = self.proc.exitcode if self.proc is not None else None
            self.close()
            raise _RemoteError("WorkerDied", f"the reward worker exited (code {code})") from None
        if status == "ok":
            return payload
        name, msg, wiring = payload
        if wiring:
            raise RewardInputError(msg)
        raise _RemoteError(name, msg)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.join()
            self.conn.close()
            self.proc = None

    # a batch whose samples keep overrunning is abandoned after this many in a row (each costs the budget)
    MAX_TIMEOUTS_IN_A_ROW = 3

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class CombinedReward:
    def __init__(self, rewards: list[tuple[RewardFn, float]], names: list[str], timeout_s: float | None = None):
        self.fns = [fn for fn, _ in rewards]
        self.weights = [float(w) for _, w in rewards]
        self.names = names
        self._warned: set[tuple[str, str]] = set()
        self.timeout_s = timeout_s if timeout_s and "fork" in multiprocessing.get_all_start_methods() else None
        self._worker = _Worker(self.fns) if self.timeout_s else None

    def _warn(self, name: str, kind: str, detail: str, completion) -> None:
        if (name, kind) in self._warned:
            return
        self._warned.add((name, kind))
        print(f"warning: reward {name!r} {detail} on completion {_shorten(completion)!r}; scored 0.0 "
              f"(further {kind} from {name!r} are not reported)", file=sys.stderr)

    def _clean(self, name: str, value, completion) -> float | None:
        """The value as a finite float, or None (a failure, warned about)."""
        try:
            x = float(value)
        except (TypeError, ValueError):
            self._warn(name, "non-numeric values", f"returned {value!r}, not a number", completion)
            return None
        if not math.isfinite(x):
            self._warn(name, "non-finite values", f"returned {x}", completion)
            return None
        return x

    def _run(self, k: int, prompts, completions, problems, kw) -> list:
        if self._worker is not None:
            values = self._worker.call(k, (prompts, completions, problems), kw, self.timeout_s)
        else:
            values = list(self.fns[k](prompts, completions, problems, **kw))
        if len(values) != len(completions):
            raise ValueError(f"returned {len(values)} values for {len(completions)} completions")
        return values

    def _component(self, k: int, prompts, completions, problems, kw) -> list[float | None]:
        name, n = self.names[k], len(completions)
        try:
            values = self._run(k, prompts, completions, problems, kw)
        except RewardInputError:
            raise
        except Exception:
            values, timeouts = [], 0
            for i in range(n):
                if timeouts >= _Worker.MAX_TIMEOUTS_IN_A_ROW:
                    self._warn(name, "abandoned batches",
                               f"overran {timeouts} samples in a row; the rest of this batch was not scored",
                               completions[i])
                    values.append(_FAILED)
                    continue
                kw_i = {k_: v[i:i + 1] if isinstance(v, (list, tuple)) and len(v) == n else v
                        for k_, v in kw.items()}
                try:
                    values.append(self._run(k, prompts[i:i + 1], completions[i:i + 1], problems[i:i + 1], kw_i)[0])
                    timeouts = 0
                except RewardInputError:
                    raise
                except _Timeout as e:
                    self._warn(name, "timeouts", str(e), completions[i])
                    values.append(_FAILED)
                    timeouts += 1
                    continue
                except _RemoteError as e:
                    self._warn(name, e.kind, f"raised {_shorten(str(e))}", completions[i])
                    values.append(_FAILED)
                except Exception as e:
                    self._warn(name, type(e).__name__, f"raised {type(e).__name__}: {_shorten(str(e))}",
                               completions[i])
                    values.append(_FAILED)
        return [None if v is _FAILED else self._clean(name, v, c) for v, c in zip(values, completions)]

    def score(self, prompts: list[str], completions: list[str], problems: list, **kw) -> RewardScores:
        n = len(completions)
        if len(prompts) != n or len(problems) != n:
            raise ValueError(f"reward called with {len(prompts)} prompts, {n} completions, {len(problems)} problems")
        raw = {name: self._component(k, list(prompts), list(completions), list(problems), kw)
               for k, name in enumerate(self.names)}
        failed = [any(raw[name][i] is None for name in self.names) for i in range(n)]
        components = {name: [0.0 if v is None else v for v in vals] for name, vals in raw.items()}
        total = [float("nan") if failed[i] else
                 sum(w * components[name][i] for name, w in zip(self.names, self.weights)) for i in range(n)]
        failures = {name: sum(v is None for v in vals) for name, vals in raw.items()}
        return RewardScores(total, components, failed, failures)

    def __call__(self, prompts: list[str], completions: list[str], problems: list, **kw) -> list[float]:
        """Weighted totals, a failed component counting 0.0 (score() says which samples failed)."""
        c = self.score(prompts, completions, problems, **kw).components
        return [sum(w * c[name][i] for name, w in zip(self.names, self.weights)) for i in range(len(completions))]

    def __repr__(self) -> str:
        return "combine(" + ", ".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights)) + ")"


def combine(rewards: list[tuple[RewardFn, float]], names: list[str] | None = None,
            timeout_s: float | None = None) -> CombinedReward:
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
    return CombinedReward(list(rewards), names, timeout_s)
