"""Pipeline-schedule simulator: simulated bubble vs the V3 report's Table 2, schedule validity, memory."""
from collections import Counter
from itertools import pairwise

import pytest

from nanoseek.common import UserError
from nanoseek.distributed import pp_sim
from nanoseek.distributed.pp_sim import Durations, caveat, run_schedule, table2


def dur(f=1.0, b=2.0, w=1.0, fb=None):
    return Durations(f, b, w, f + b if fb is None else fb)


# (pp, chunks, F, B, W, F&B), each inside the schedule's assumptions (see the module docstring)
EXACT = {
    "1f1b": [(4, 8, 1, 2, 1, None), (8, 16, 1, 3, 1, None), (3, 5, 2, 3, 1, None), (6, 2, 1, 2, 0.5, None)],
    "zb1p": [(4, 8, 1, 2, 1, None), (8, 16, 2, 3, 1, None), (5, 7, 1.5, 2, 0.5, None), (4, 4, 1, 3, 1, None)],
    "dualpipe": [(4, 8, 1, 2, 1, None), (8, 16, 1, 2, 1, 2.5), (8, 20, 1, 3, 1, 3.5), (6, 14, 2, 5, 1, 6),
                 (2, 4, 1, 2, 0.5, 2)],
    "dualpipev": [(4, 4, 1, 2, 1, None), (8, 16, 1, 2, 1, 2), (8, 11, 1, 3, 1, 3.5), (12, 13, 2, 5, 1, 5.5)],
}
CASES = [(name, *c) for name, cs in EXACT.items() for c in cs]


@pytest.mark.parametrize("name,pp,chunks,f,b,w,fb", CASES)
def test_bubble_equals_table2(name, pp, chunks, f, b, w, fb):
    d = dur(f, b, w, fb)
    rep = run_schedule(name, pp, chunks, d)
    assert caveat(name, pp, chunks, d) is None
    assert rep.bubble == pytest.approx(table2(name, pp, d).bubble, abs=1e-9)
    for r in rep.ranks:     # makespan = busy + bubble on every rank, by definition
        assert r.busy + r.bubble == pytest.approx(rep.makespan)
    if name in ("1f1b", "zb1p"):   # every rank does the same work, so every rank has the same bubble
        assert {round(r.bubble, 9) for r in rep.ranks} == {round(rep.bubble, 9)}


def test_dualpipe_worst_rank_is_the_one_running_most_pairs():
    rep = run_schedule("dualpipe", 8, 16, dur(fb=2.5))
    assert [r.bubble for r in rep.ranks] == [3.0, 3.5, 4.0, 4.5, 4.5, 4.0, 3.5, 3.0]


@pytest.mark.parametrize("name,pp,chunks,d,extra", [
    ("zb1p", 4, 8, dur(f=0.5, b=2, w=1), 3 * 0.5),            # W > F: (PP-1) (W-F)
    ("zb1p", 4, 8, dur(f=1, b=1.5, w=1), 3 * 0.5),            # W > B-W: (PP-1) (2W-B)
    ("dualpipe", 8, 16, dur(f=2, b=2, w=1, fb=3), 3 * 1),     # F > B-W: (PP/2-1) (F+W-B)
    ("dualpipev", 8, 8, dur(f=1, b=1.5, w=1, fb=2), 3 * 1),   # F and W > B-W: (PP/2-1) (0.5 + 0.5)
])
def test_documented_excess_outside_assumptions(name, pp, chunks, d, extra):
    assert caveat(name, pp, chunks, d) is not None
    rep = run_schedule(name, pp, chunks, d)
    assert rep.bubble - table2(name, pp, d).bubble == pytest.approx(extra)


SETTINGS = [(name, pp, chunks) for name, pp, chunks in [
    ("1f1b", 4, 8), ("1f1b", 5, 3), ("zb1p", 4, 8), ("zb1p", 5, 3), ("dualpipe", 4, 8), ("dualpipe", 6, 14),
    ("dualpipev", 4, 4), ("dualpipev", 8, 11)]]


def _key(p):
    return ("B" if p.kind == "b" else p.kind, p.stage, p.mb)


@pytest.mark.parametrize("name,pp,chunks", SETTINGS)
def test_no_op_runs_before_its_inputs(name, pp, chunks):
    rep = run_schedule(name, pp, chunks, dur(f=1, b=3, w=1, fb=3.5))
    end = {_key(p): s.end for slots in rep.timeline for s in slots for p in s.op}
    for slots in rep.timeline:
        for prev, s in pairwise(slots):
            assert s.start >= prev.end           # one op at a time, in program order
        for s in slots:
            for p in s.op:                       # the dependency rules, restated here
                deps = {"F": [("F", p.stage - 1, p.mb)] if p.stage else [],
                        "W": [("B", p.stage, p.mb)]}.get(
                    p.kind, [("F", p.stage, p.mb)] + ([("B", p.stage + 1, p.mb)] if p.stage < pp - 1 else []))
                assert all(end[k] <= s.start for k in deps), (p, deps)


@pytest.mark.parametrize("name,pp,chunks", SETTINGS)
def test_every_microbatch_passes_every_stage_once(name, pp, chunks):
    program = pp_sim.SCHEDULES[name](pp, chunks)
    seen = Counter(p for ops in program for op in ops for p in op)
    for stage in range(pp):
        for mb in range(chunks):
            f, full, split, w = (seen[pp_sim.Pass(k, stage, mb)] for k in ("F", "B", "b", "W"))
            assert (f, full + split, w) == (1, 1, split), (stage, mb)
    assert sum(seen.values()) == sum(seen[p] for p in seen if p.stage < pp and p.mb < chunks)
    for ops in program:                          # a rank only runs the stages it holds: 1, or r and PP-1-r
        stages = {p.stage for op in ops for p in op}
        assert len(stages) == (1 if name in ("1f1b", "zb1p") else 2)
        assert len(stages) == 1 or sum(stages) == pp - 1
    if name == "zb1p":
        assert all(p.kind != "B" for p in seen)


@pytest.mark.parametrize("pp,chunks", [(4, 8), (8, 16), (6, 30)])
def test_memory_matches_table2(pp, chunks):
    for name in pp_sim.SCHEDULES:
        rep = run_schedule(name, pp, chunks, dur())
        t = table2(name, pp, dur())
        assert max(r.peak_act for r in rep.ranks) == t.act
        assert max(len(r.stages) for r in rep.ranks) == t.params
        assert len(rep.ranks) == t.devices
    assert [r.peak_act for r in run_schedule("1f1b", pp, chunks, dur()).ranks] == list(range(pp, 0, -1))
    assert [r.peak_act for r in run_schedule("zb1p", pp, chunks, dur()).ranks] == [pp] * pp


def test_dualpipe_is_two_mirrored_dualpipev():
    d = dur(f=1, b=3, w=1, fb=3.5)
    bi, v = run_schedule("dualpipe", 8, 20, d), run_schedule("dualpipev", 8, 10, d)
    shape = lambda slots: [(s.start, s.end, tuple((p.kind, p.stage) for p in s.op)) for s in slots]
    for r in range(8):
        assert shape(bi.timeline[r]) == shape(v.timeline[min(r, 7 - r)])


@pytest.mark.parametrize("argv,flag", [
    (["--pp", "3"], "--pp 3"), (["--pp", "4", "--chunks", "6"], "--chunks 8"),
    (["--pp", "4", "--chunks", "9", "--schedule", "dualpipe"], "--chunks 10"),
    (["--pp", "8", "--chunks", "6", "--schedule", "dualpipev"], "--chunks 8"),
    (["--w", "3"], "--w"), (["--f", "0"], "--f"), (["--fb", "1.5"], "--fb"), (["--fb", "3.5"], "--fb"),
])
def test_bad_input_names_the_flag_and_the_fix(argv, flag):
    with pytest.raises(UserError, match=flag):
        pp_sim.main(argv)


def test_cli(capsys):
    from nanoseek import cli
    assert cli.main(["pp-sim", "--pp", "4", "--chunks", "8", "--timeline"]) == 0
    out = capsys.readouterr().out
    for text in ("(PP-1)(F+B-2W)", "(PP/2-1)(F&B+B-3W)", "PP+1 = 5", "DualPipeV", "rank 0"):
        assert text in out
    assert "*" not in out.split("per rank")[0]     # defaults meet every formula's assumptions
    assert cli.main(["pp-sim", "--pp", "5"]) == 2
    assert "even number of stages" in capsys.readouterr().err
