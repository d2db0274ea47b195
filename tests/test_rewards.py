import math
import subprocess
import sys

import pytest

from nanoseek.data.tasks import Arithmetic, Problem
from nanoseek.rewards import (REWARDS, RewardInputError, accuracy_reward, build_reward, combine, countdown_reward,
                              format_reward, language_consistency_reward, soft_overlong_punishment,
                              tag_count_reward)

ADD = Problem("arithmetic", "347+285=?", "632")
EQ = Problem("equations", "Solve 3x+5=20 for x", "5")
CD = Problem("countdown", "Use 25 7 3 4 to make 58", "(25-7)*3+4", {"numbers": [25, 7, 3, 4], "target": 58})
HALF = Problem("jsonl", "half?", "\\frac{1}{2}")


def call(fn, completions, problems=None, **kw):
    problems = problems or [ADD] * len(completions)
    return fn([""] * len(completions), completions, problems, **kw)


def test_accuracy_dispatches_on_task():
    completions = ["<think>..</think><answer>632</answer>", "<answer>631</answer>", "<answer>x=5</answer>",
                   "<answer>4+3*(25-7)</answer>", "<answer>(25-7)*3</answer>", "<answer>0.5</answer>",
                   "632", "<answer>632</answer><answer>1</answer>"]
    problems = [ADD, ADD, EQ, CD, CD, HALF, ADD, ADD]
    assert call(accuracy_reward, completions, problems) == [1, 0, 1, 1, 0, 1, 0, 0]


def test_countdown_partial_credit():
    fn = countdown_reward(format_score=0.1)
    got = call(fn, ["<answer>(25-7)*3+4</answer>", "<answer>25+7+3+4</answer>", "<answer>rm -rf</answer>",
                    "(25-7)*3+4"], [CD] * 4)
    assert got == [1.0, 0.1, 0.1, 0.0]
    assert call(countdown_reward(0.0), ["<answer>1</answer>"], [CD]) == [0.0]
    with pytest.raises(ValueError, match="format_score"):
        countdown_reward(2.0)


def test_format_and_tag_count():
    completions = ["<think>a</think><answer>1</answer>", "<answer>1</answer>", "<think>a</think>",
                   "<answer>1</answer><think>a</think>", "<think><think>a</think><answer>1</answer>", "nothing"]
    assert call(format_reward, completions) == [1, 0, 0, 0, 0, 0]
    assert call(tag_count_reward, completions) == [1.0, 0.5, 0.5, 0.5, 0.75, 0.0]


def test_language_consistency():
    en = language_consistency_reward("en")
    got = call(en, ["<think>add the units first</think><answer>1</answer>",
                    "<think>add 这个 then carry, 好</think><answer>1</answer>",
                    "<think>7+5=12, 4+8+1=13</think><answer>632</answer>",
                    "no think block, café <answer>1</answer>"])
    assert got == [1.0, pytest.approx(3 / 5), 1.0, pytest.approx(3 / 4)]
    zh = language_consistency_reward("zh")
    assert call(zh, ["<think>先算个位 then 进位</think>"]) == [pytest.approx(2 / 3)]
    with pytest.raises(ValueError, match="en, zh"):
        language_consistency_reward("xx")


def test_soft_overlong_numbers():
    fn = soft_overlong_punishment(max_len=100, cache_len=20)
    lengths = [0, 80, 90, 95, 100, 101, 120]
    assert call(fn, ["c"] * 7, completion_lengths=lengths) == [0.0, 0.0, -0.5, -0.75, -1.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="completion_lengths"):
        call(fn, ["c"])
    with pytest.raises(ValueError, match="cache_len"):
        soft_overlong_punishment(100, 200)
    # a wiring bug is not a bad sample: combine lets it through
    with pytest.raises(RewardInputError):
        combine([(fn, 1.0)])([""], ["c"], [ADD])


def test_combine_weighted_sum_and_components():
    r = combine([(accuracy_reward, 1.0), (format_reward, 0.5), (soft_overlong_punishment(100, 20), 1.0)])
    completions = ["<think>x</think><answer>632</answer>", "<answer>632</answer>", "<answer>1</answer>"]
    got = r([""] * 3, completions, [ADD] * 3, completion_lengths=[10, 90, 120])
    assert got == [1.5, 0.5, -1.0]
    components = r.score([""] * 3, completions, [ADD] * 3, completion_lengths=[10, 90, 120]).components
    assert components == {"accuracy_reward": [1.0, 1.0, 0.0], "format_reward": [1.0, 0.0, 0.0],
                          "soft_overlong_punishment": [0.0, -0.5, -1.0]}
    with pytest.raises(ValueError, match="names"):
        combine([(format_reward, 1.0)], names=["a", "b"])
    with pytest.raises(ValueError, match="weight"):
        combine([(format_reward, float("nan"))])


def test_combine_survives_a_crashing_reward(capsys):
    def fragile(prompts, completions, problems, **kw):
        return [1.0 / (len(c) - 5) for c in completions]           # ZeroDivisionError on 5-char text

    def sloppy(prompts, completions, problems, **kw):
        return [float("nan") if "nan" in c else None if "none" in c else 2.0 for c in completions]

    r = combine([(fragile, 1.0), (sloppy, 1.0)], names=["fragile", "sloppy"])
    long_bad = "B" * 5
    got = r([""] * 4, ["abcdef", long_bad, "xnanxx", "none?!"], [ADD] * 4)
    assert got == [1.0 + 2.0, 0.0 + 2.0, 1.0 + 0.0, 1.0 + 0.0]
    assert all(isinstance(x, float) and math.isfinite(x) for x in got)
    err = capsys.readouterr().err
    assert "'fragile'" in err and "ZeroDivisionError" in err and long_bad in err
    assert "'sloppy'" in err and "nan" in err and "None" in err

    r([""] * 2, ["BBBBB", "CCCCC"], [ADD] * 2)                     # same failure again: reported once
    assert capsys.readouterr().err == ""

    def always(prompts, completions, problems, **kw):
        raise RuntimeError("boom")

    huge = "Z" * 5000
    r2 = combine([(always, 1.0), (format_reward, 1.0)], names=["always", "format"])
    assert r2([""] * 2, [huge, "<think>t</think><answer>1</answer>"], [ADD] * 2) == [0.0, 1.0]
    line = capsys.readouterr().err
    assert "boom" in line and "Z" * 196 in line and "Z" * 201 not in line


def test_combine_slices_per_sample_kwargs():
    seen = []

    def picky(prompts, completions, problems, completion_lengths=None, **kw):
        if len(completions) > 1:
            raise ValueError("one at a time please")
        seen.append(completion_lengths)
        return [float(completion_lengths[0])]

    assert combine([(picky, 2.0)])([""] * 2, ["a", "b"], [ADD] * 2, completion_lengths=[3, 4]) == [6.0, 8.0]
    assert seen == [[3], [4]]


def test_build_reward():
    r = build_reward("accuracy:1.0, format:0.2")
    assert r.names == ["accuracy", "format"] and r.weights == [1.0, 0.2]
    assert r([""], ["<think>t</think><answer>632</answer>"], [ADD]) == [pytest.approx(1.2)]
    assert build_reward("tag_count").weights == [1.0]
    assert set(REWARDS) == {"accuracy", "format", "tag_count", "language", "countdown"}
    with pytest.raises(ValueError, match="'acurracy'.*accuracy, format, tag_count, language, countdown"):
        build_reward("acurracy:1.0")
    with pytest.raises(ValueError, match="weight of reward 'format'.*'high'"):
        build_reward("accuracy:1,format:high")
    for bad in ["", "accuracy:1,,format:1", "accuracy:1,accuracy:2", "accuracy:inf"]:
        with pytest.raises(ValueError):
            build_reward(bad)


def test_rewards_do_not_import_torch_or_model():
    code = ("import sys, nanoseek.rewards, nanoseek.data.tasks; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('nanoseek.model')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_arithmetic_check_reachable_via_registry_defaults():
    # checkers ignore knobs: a 5-digit problem graded by the default (max 3 digits) task
    p = Arithmetic(min_digits=5, max_digits=5).problems(1, 0)[0]
    assert call(accuracy_reward, [f"<answer>{p.answer}</answer>"], [p]) == [1.0]


def _slow_on_x(prompts, completions, problems, **kw):
    import time
    if any("x" in c for c in completions):
        time.sleep(30)                       # a reward that hangs on some completions
    return [1.0 for _ in completions]


def test_reward_time_budget_failures_and_baseline():
    """With a budget, a reward that hangs on one completion costs about the budget twice (the batch, then
    that sample), scores the others, and reports the hung sample as failed (NaN total, counted)."""
    import time
    r = combine([(_slow_on_x, 1.0), (lambda p, c, pr, **kw: [0.5] * len(c), 1.0)], names=["slow", "flat"],
                timeout_s=0.5)
    t = time.perf_counter()
    s = r.score([""] * 3, ["a", "x", "b"], [ADD] * 3)
    assert time.perf_counter() - t < 5
    assert s.failed == [False, True, False] and s.failures == {"slow": 1, "flat": 0}
    assert s.total[0] == 1.5 and math.isnan(s.total[1]) and s.total[2] == 1.5
    assert r([""] * 2, ["a", "b"], [ADD] * 2) == [1.5, 1.5]          # the worker came back for the next call
    with pytest.raises(RewardInputError):                             # wiring bugs still surface through it
        combine([(soft_overlong_punishment(100, 20), 1.0)], timeout_s=1.0)([""], ["c"], [ADD])


def test_quadratic_format_input_is_fast_now():
    import time
    t = time.perf_counter()
    assert format_reward([""], ["<think>" + "</think><answer>" * 20000 + "x"], [ADD]) == [0.0]
    assert time.perf_counter() - t < 0.1


def test_user_rewards_by_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, problems, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from nanoseek.rewards import build_reward
    r = build_reward("accuracy:1,my_rewards:brevity:0.5")
    assert r.names == ["accuracy", "brevity"]
    assert r([""], ["<answer>632</answer>"], [ADD]) == [1.0 + 0.5 / 21]
    assert build_reward("my_rewards:brevity").weights == [1.0]
    with pytest.raises(ValueError, match="cannot import 'no_such_module'"):
        build_reward("no_such_module:fn")
    with pytest.raises(ValueError, match="has no 'nope'"):
        build_reward("my_rewards:nope:1")


def _dies_on_x(prompts, completions, problems, **kw):
    import os
    if any("x" in c for c in completions):
        os._exit(3)
    return [1.0 for _ in completions]


def test_a_reward_that_kills_its_worker_fails_only_its_sample():
    r = combine([(_dies_on_x, 1.0)], names=["dies"], timeout_s=5.0)
    for _ in range(3):                                  # a worker that died is replaced, every time
        s = r.score([""] * 3, ["a", "x", "b"], [ADD] * 3)
        assert s.failed == [False, True, False], s.failed
    assert r([""] * 2, ["a", "b"], [ADD] * 2) == [1.0, 1.0]


def test_a_batch_that_keeps_overrunning_is_abandoned():
    import time
    r = combine([(_slow_on_x, 1.0)], names=["slow"], timeout_s=0.3)
    t = time.perf_counter()
    s = r.score([""] * 8, ["x"] * 8, [ADD] * 8)
    assert all(s.failed) and time.perf_counter() - t < 0.3 * (1 + 3) + 2        # the batch, then 3 samples
