"""`nanoseek pp-sim`: simulate pipeline schedules and measure the bubble and memory of every rank.

Pipeline parallelism (PP) cuts the layers into PP stages and a batch into microbatches ("chunks").
A schedule is, for each rank, the ordered list of operations it runs:

    F   forward of one microbatch through one stage
    B   full backward of one microbatch through one stage (input grads and weight grads)
    b   backward for the inputs only; the weight-grad part W is deferred (ZeroBubble's split)
    W   backward for the weights of a microbatch whose b already ran
    X   an overlapped F&B pair: one microbatch's F and another's full B run as one op (DualPipe)

This module writes each schedule out as those per-rank lists, then replays them against a clock (an
event loop over op completions). A rank runs its list strictly in order, one op at a time; an op
starts once the rank is free and every pass it needs has finished:
F of stage s needs F of stage s-1 (same microbatch); B or b of stage s needs its own F and the
backward of stage s+1; W needs its b. Communication is free. From the replay we measure, per rank:

    makespan   end of the whole step (all ranks start at 0; the optimizer waits for the last op)
    busy       time spent running ops
    bubble     makespan - busy: the time the rank sits idle inside the step
    peak act.  most microbatch activations held at once, one unit = one microbatch through one
               stage's layers, held from its F until its B (or until its W when the backward is split,
               because W needs the stage input again)
    params     stage copies the rank holds (1 or 2)

Schedules (rank r, PP stages; all four process the same chunks x PP stage-passes per step):
    1F1B       rank r runs stage r: PP-1-r warmup forwards, then alternate F and B, then drain.
    ZB1P       ZeroBubble's handcrafted ZB-H1: 1F1B with B split into b + W. Rank r holds back its W's
               by r microbatches (W of microbatch m runs after b of m+r) and runs the r held-back W's
               at the end, where 1F1B leaves rank r waiting for backwards; peak memory stays PP.
    DualPipe   PP ranks, microbatches enter from both ends (chunks/2 each way). Rank r holds stage r of
               the downward pipeline and stage PP-1-r of the upward one (two parameter copies). Each
               rank follows the eight steps of spec section 2.2 with half_rank h = min(r, PP-1-r):
               fill with forwards, zero-bubble b W F rounds, a steady state of overlapped F&B pairs,
               then a drain of backwards whose second half is split, and the held-back W's.
    DualPipeV  the same steps "cut in half": PP/2 devices, all microbatches enter at rank 0, go down
               stages 0..PP/2-1, turn on the last device and come back up; device r holds stages r
               and PP-1-r. DualPipe on PP ranks and C chunks is two mirrored copies of DualPipeV on
               PP/2 devices and C/2 chunks (a test checks the timelines are identical).

What Table 2 of the V3 report calls the bubble, and when we reproduce it exactly. F, B, W are the
durations of one forward, one full backward and one weight-grad pass of one stage, so a split backward
b takes B-W. F&B is an overlapped pair, between max(F, B) (perfect overlap) and F+B (no gain, the
default). Durations are equal on every stage and microbatch and communication is free. The bubble is
the idle time of a rank over one step; we report the worst rank. In 1F1B and ZB1P all ranks are equal.
In DualPipe(V) with F&B < F+B the middle ranks (DualPipeV: the last device) run the most pairs and so
idle the most; theirs is the formula. Simulated worst bubble = formula exactly when (checked over a
grid of durations; the tests pin several):
    1F1B        always, any chunks                              (PP-1)(F+B)
    ZB1P        chunks >= PP, W <= F and W <= B-W               (PP-1)(F+B-2W)
    DualPipe    F <= B-W and W <= B-W (chunks even, >= 2 PP)    (PP/2-1)(F&B+B-3W)
    DualPipeV   F <= B-W and W <= B-W (chunks >= PP)            (PP/2-1)(F&B+B-3W)
The defaults F=1, B=2, W=1 (b = F = W, ZeroBubble's own assumption) meet them all. Outside them we do
not bend the schedules to fit; the simulated bubble is then larger, by exactly
    ZB1P        (PP-1) max(0, W-F, 2W-B): each held-back W fills a hole one forward hop (F) or one
                backward hop (B-W) long; a longer W overruns it and delays the critical path. With
                chunks < PP the pipeline never fills and the formula does not apply.
    DualPipe(V) (PP/2-1) (max(0, F+W-B) + max(0, 2W-B)): our reading is that the step counts let a b
                slot (B-W) cover the wait for a neighbour's F or W, so a longer F or W leaves a gap at
                each of the PP/2-1 hand-offs of the fill and drain.
Not modelled: communication, uneven stages (embedding, head, MTP), and a tweak in the official DualPipe
code that is not in the spec's step list: its middle ranks run their first pair as F then B.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .. import args as argparse_dc
from ..common import UserError

NAMES = {"1f1b": "1F1B", "zb1p": "ZB1P", "dualpipe": "DualPipe", "dualpipev": "DualPipeV"}


class Pass(NamedTuple):
    """One microbatch through one stage: kind F, B (full backward), b (inputs only) or W."""
    kind: str
    stage: int
    mb: int


Op = tuple  # tuple[Pass, ...]: one pass, or an overlapped (F, B) pair run as one op


@dataclass
class Durations:
    f: float
    b: float
    w: float
    fb: float

    def of(self, op: Op) -> float:
        if len(op) == 2:
            return self.fb
        return {"F": self.f, "B": self.b, "b": self.b - self.w, "W": self.w}[op[0].kind]


def done_key(p: Pass) -> tuple[str, int, int]:
    """What finishing `p` provides: a full or split backward both provide the input grad, "B"."""
    return ("B" if p.kind == "b" else p.kind, p.stage, p.mb)


def needs(p: Pass, n_stages: int) -> list[tuple[str, int, int]]:
    """The passes `p` waits for, as done_key()s."""
    if p.kind == "F":
        return [("F", p.stage - 1, p.mb)] if p.stage > 0 else []
    if p.kind == "W":
        return [("B", p.stage, p.mb)]
    deps = [("F", p.stage, p.mb)]                   # its own activations (the loss, on the last stage)
    if p.stage < n_stages - 1:
        deps.append(("B", p.stage + 1, p.mb))      # the output grad from the next stage
    return deps


# ---- schedules: per-rank op lists -------------------------------------------------------------

class _Rank:
    """Builds one rank's op list from steps like "forward the next microbatch of phase 0". A phase is one
    stage copy on this rank with the stream of microbatches that pass through it. Microbatches enter a
    phase in order and leave it (backward) in the same order; deferred W's run oldest first."""

    def __init__(self, stages: tuple[int, ...], streams: tuple[range, ...]):
        self.stages, self.streams = stages, streams
        self.n_f, self.n_b = [0] * len(stages), [0] * len(stages)
        self.held_w: deque[Pass] = deque()
        self.ops: list[Op] = []

    def _f(self, ph: int) -> Pass:
        self.n_f[ph] += 1
        return Pass("F", self.stages[ph], self.streams[ph][self.n_f[ph] - 1])

    def _b(self, ph: int, split: bool) -> Pass:
        self.n_b[ph] += 1
        p = Pass("b" if split else "B", self.stages[ph], self.streams[ph][self.n_b[ph] - 1])
        if split:
            self.held_w.append(Pass("W", p.stage, p.mb))
        return p

    def F(self, ph: int = 0):
        self.ops.append((self._f(ph),))

    def B(self, ph: int = 0, split: bool = False):
        self.ops.append((self._b(ph, split),))

    def W(self):
        self.ops.append((self.held_w.popleft(),))

    def FB(self, f_ph: int, b_ph: int):
        self.ops.append((self._f(f_ph), self._b(b_ph, split=False)))


def schedule_1f1b(pp: int, chunks: int, zero_bubble: bool = False) -> list[list[Op]]:
    program = []
    for r in range(pp):
        rk = _Rank((r,), (range(chunks),))
        warmup = min(pp - 1 - r, chunks)
        for _ in range(warmup):
            rk.F()
        for i in range(chunks):
            if warmup + i < chunks:
                rk.F()
            rk.B(split=zero_bubble)
            if zero_bubble and i >= r:     # ZB-H1: rank r runs W of microbatch i-r here
                rk.W()
        while rk.held_w:                   # ...and its last r W's fill the tail
            rk.W()
        program.append(rk.ops)
    return program


def _dualpipe_steps(rk: _Rank, n: int, h: int, c: int) -> list[Op]:
    """Spec 2.2's eight steps for a rank h hops from its entry end, in a half-pipeline of n ranks, with c
    microbatches per phase. Phase 0 is the rank's stage on the way in, phase 1 its stage on the way out."""
    for _ in range(2 * (n - h - 1)):            # 1. fill with phase-0 forwards
        rk.F(0)
    for _ in range(h + 1):                      # 2. forwards of both phases
        rk.F(0)
        rk.F(1)
    for _ in range(n - h - 1):                  # 3. zero-bubble: split B1, a W, F1
        rk.B(1, split=True)
        rk.W()
        rk.F(1)
    for _ in range(c - 2 * n + h + 1):          # 4. steady state: overlapped pairs
        rk.FB(0, 1)
        rk.FB(1, 0)
    for _ in range(n - h - 1):                  # 5. B1, then a pair
        rk.B(1)
        rk.FB(1, 0)
    for k in range(2 * (h + 1)):                # 6. drain B1 B0 B1 B0 ..., the last h+1 split
        rk.B(1 if k % 2 == 0 else 0, split=k >= h + 1)
    for _ in range(n - h - 1):                  # 7. a W, then a split B0
        rk.W()
        rk.B(0, split=True)
    while rk.held_w:                            # 8. the held-back W's (h+1 of them)
        rk.W()
    return rk.ops


def schedule_dualpipev(pp: int, chunks: int) -> list[list[Op]]:
    n = pp // 2
    return [_dualpipe_steps(_Rank((r, pp - 1 - r), (range(chunks),) * 2), n, r, chunks) for r in range(n)]


def schedule_dualpipe(pp: int, chunks: int) -> list[list[Op]]:
    n, c = pp // 2, chunks // 2
    down, up = range(c), range(c, chunks)   # microbatches entering at rank 0 / at rank PP-1
    program = []
    for r in range(pp):
        h = min(r, pp - 1 - r)              # rank r runs down-stage r and up-stage PP-1-r: stages h, PP-1-h
        near, far = (down, up) if r < n else (up, down)
        program.append(_dualpipe_steps(_Rank((h, pp - 1 - h), (near, far)), n, h, c))
    return program


SCHEDULES = {"1f1b": schedule_1f1b, "zb1p": lambda pp, chunks: schedule_1f1b(pp, chunks, zero_bubble=True),
             "dualpipe": schedule_dualpipe, "dualpipev": schedule_dualpipev}


# ---- the simulation ---------------------------------------------------------------------------

class Slot(NamedTuple):
    start: float
    end: float
    op: Op


def simulate(program: list[list[Op]], n_stages: int, dur: Durations) -> list[list[Slot]]:
    """Replay the per-rank op lists against a clock. Events are op completions; after each one, every
    idle rank whose next op has all its inputs starts it at the current time."""
    finished: set[tuple[str, int, int]] = set()
    pos, idle = [0] * len(program), set(range(len(program)))
    timeline: list[list[Slot]] = [[] for _ in program]
    events: list[tuple[float, int]] = []

    def start_ready(now: float):
        for r in sorted(idle):
            if pos[r] < len(program[r]):
                op = program[r][pos[r]]
                if all(k in finished for p in op for k in needs(p, n_stages)):
                    timeline[r].append(Slot(now, now + dur.of(op), op))
                    pos[r] += 1
                    idle.discard(r)
                    heapq.heappush(events, (now + dur.of(op), r))

    start_ready(0.0)
    while events:
        now, r = heapq.heappop(events)
        finished.update(done_key(p) for p in timeline[r][-1].op)
        idle.add(r)
        start_ready(now)
    for r, ops in enumerate(program):
        if pos[r] < len(ops):
            raise RuntimeError(f"deadlock: rank {r} waits forever at op {pos[r]} {ops[pos[r]]}")
    return timeline


def peak_activations(ops: list[Op]) -> int:
    """Count +1 when an F starts and -1 when a full B (or the W of a split one) ends."""
    held = peak = 0
    for op in ops:
        held += sum(p.kind == "F" for p in op)
        peak = max(peak, held)
        held -= sum(p.kind in ("B", "W") for p in op)
    return peak


@dataclass
class RankReport:
    stages: tuple[int, ...]
    busy: float
    bubble: float
    peak_act: int


@dataclass
class Report:
    name: str
    makespan: float
    ranks: list[RankReport]
    timeline: list[list[Slot]] = field(repr=False)

    @property
    def bubble(self) -> float:
        return max(r.bubble for r in self.ranks)


def run_schedule(name: str, pp: int, chunks: int, dur: Durations) -> Report:
    program = SCHEDULES[name](pp, chunks)
    timeline = simulate(program, pp, dur)
    makespan = max(s.end for slots in timeline for s in slots)
    ranks = []
    for ops, slots in zip(program, timeline):
        busy = sum(s.end - s.start for s in slots)
        ranks.append(RankReport(tuple(sorted({p.stage for op in ops for p in op})), busy, makespan - busy,
                                peak_activations(ops)))
    return Report(name, makespan, ranks, timeline)


# ---- the V3 report's Table 2, and when it applies ---------------------------------------------

class Table2(NamedTuple):
    """One row of Table 2 in the DeepSeek-V3 report (sec. 3.2.2), at PP stages."""
    bubble_text: str
    bubble: float
    params: int
    act_text: str
    act: int
    devices: int


def table2(name: str, pp: int, d: Durations) -> Table2:
    if name == "1f1b":
        return Table2("(PP-1)(F+B)", (pp - 1) * (d.f + d.b), 1, "PP", pp, pp)
    if name == "zb1p":
        return Table2("(PP-1)(F+B-2W)", (pp - 1) * (d.f + d.b - 2 * d.w), 1, "PP", pp, pp)
    devices = pp if name == "dualpipe" else pp // 2
    return Table2("(PP/2-1)(F&B+B-3W)", (pp // 2 - 1) * (d.fb + d.b - 3 * d.w), 2, "PP+1", pp + 1, devices)


def caveat(name: str, pp: int, chunks: int, d: Durations) -> str | None:
    """Why the formula does not hold here, or None when it does (see the module docstring)."""
    bi = d.b - d.w
    if name == "zb1p" and chunks < pp:
        return "ZB1P needs --chunks >= PP to fill the pipeline"
    if name == "zb1p" and d.w > min(d.f, bi):
        extra = (pp - 1) * (d.w - min(d.f, bi))
        return f"ZB1P needs W <= F and W <= B-W; expect (PP-1)*max(W-F, 2W-B) = {extra:g} more"
    if name in ("dualpipe", "dualpipev") and max(d.f, d.w) > bi:
        extra = (pp // 2 - 1) * (max(0.0, d.f - bi) + max(0.0, d.w - bi))
        return (f"{NAMES[name]} needs F <= B-W and W <= B-W; "
                f"expect (PP/2-1)*(max(0,F+W-B)+max(0,2W-B)) = {extra:g} more")
    return None


# ---- command line -----------------------------------------------------------------------------

@dataclass
class PPSimConfig:
    pp: int = field(default=4, metadata={"help": "pipeline stages PP (DualPipeV runs them on PP/2 devices)"})
    chunks: int = field(default=8, metadata={"help": "microbatches per step (DualPipe: half from each end)"})
    f: float = field(default=1.0, metadata={"help": "F: forward of one microbatch through one stage"})
    b: float = field(default=2.0, metadata={"help": "B: full backward (input and weight grads) of one stage"})
    w: float = field(default=1.0, metadata={"help": "W: the weight-grad part of B; a split backward takes B-W"})
    fb: float | None = field(default=None, metadata={"help": "F&B: an overlapped pair, max(F,B) to F+B (unset: F+B)"})
    schedule: str = field(default="all", metadata={"help": "which schedule to simulate",
                                                   "choices": ["all", *SCHEDULES]})
    timeline: bool = field(default=False, metadata={"help": "also draw each rank's ops over time"})


def check(cfg: PPSimConfig, names: list[str]) -> None:
    if cfg.pp < 1 or cfg.chunks < 1:
        raise UserError(f"--pp {cfg.pp} --chunks {cfg.chunks}: both must be >= 1")
    if cfg.f <= 0 or cfg.b <= 0:
        raise UserError(f"--f {cfg.f} --b {cfg.b}: durations must be > 0")
    if not 0 <= cfg.w <= cfg.b:
        raise UserError(f"--w {cfg.w}: W is the weight-grad part of the full backward: 0 <= --w <= --b ({cfg.b})")
    if cfg.fb is not None and not max(cfg.f, cfg.b) <= cfg.fb <= cfg.f + cfg.b:
        raise UserError(f"--fb {cfg.fb}: an overlapped F&B pair takes between max(F, B) = {max(cfg.f, cfg.b)} "
                        f"(perfect overlap) and F+B = {cfg.f + cfg.b} (none); pick a value in that range")
    for name in names:
        if name in ("dualpipe", "dualpipev") and cfg.pp % 2:
            raise UserError(f"--pp {cfg.pp}: {NAMES[name]} needs an even number of stages (a rank holds stages r "
                            f"and PP-1-r); use --pp {cfg.pp + 1}, or --schedule 1f1b or zb1p")
        if name == "dualpipe" and (cfg.chunks % 2 or cfg.chunks < 2 * cfg.pp):
            raise UserError(f"--chunks {cfg.chunks}: DualPipe needs an even --chunks >= 2*PP = {2 * cfg.pp} (half "
                            f"enter from each end); use --chunks {max(2 * cfg.pp, cfg.chunks + cfg.chunks % 2)}")
        if name == "dualpipev" and cfg.chunks < cfg.pp:
            raise UserError(f"--chunks {cfg.chunks}: DualPipeV needs --chunks >= PP = {cfg.pp} (twice its PP/2 "
                            f"devices); use --chunks {cfg.pp}")


def format_timeline(rep: Report, width: int = 200) -> str:
    """One row per rank, one character per tick: F, B, b (input-grad backward), W, X (overlapped F&B);
    an op is its letter then '-' for its length; '.' is idle."""
    lengths = [s.end - s.start for slots in rep.timeline for s in slots if s.end > s.start]
    tick = max(min(lengths), rep.makespan / width)
    rows = []
    for r, slots in enumerate(rep.timeline):
        row = ["."] * round(rep.makespan / tick)
        for s in slots:
            a, z = round(s.start / tick), round(s.end / tick)
            letter = "X" if len(s.op) == 2 else s.op[0].kind
            row[a:z] = list((letter + "-" * (z - a))[:z - a])
        rows.append(f"  rank {r:<3}|{''.join(row)}|")
    return f"{NAMES[rep.name]} (1 char = {tick:g})\n" + "\n".join(rows)


def main(argv=None) -> list[Report]:
    cfg = argparse_dc.parse(PPSimConfig, argv, prog="nanoseek pp-sim", description=__doc__.splitlines()[0])
    names = list(SCHEDULES) if cfg.schedule == "all" else [cfg.schedule]
    check(cfg, names)
    d = Durations(cfg.f, cfg.b, cfg.w, cfg.fb if cfg.fb is not None else cfg.f + cfg.b)
    reports = [run_schedule(n, cfg.pp, cfg.chunks, d) for n in names]
    print(f"PP={cfg.pp} stages, {cfg.chunks} microbatches; F={d.f:g} B={d.b:g} W={d.w:g} F&B={d.fb:g} "
          f"(split backward B-W={d.b - d.w:g}); bubble = makespan - busy, worst rank; act in microbatch-stages")
    head = (f"{'schedule':<10}{'devices':>8}{'makespan':>10}{'bubble':>8}  {'V3 Table 2 bubble':<20}{'value':>6}"
            f"{'params':>8}{'act':>5}  {'Table 2 act'}")
    lines, notes = [head, "-" * len(head)], []
    for rep in reports:
        t = table2(rep.name, cfg.pp, d)
        act = max(r.peak_act for r in rep.ranks)
        params = max(len(r.stages) for r in rep.ranks)
        mine = []
        if abs(rep.bubble - t.bubble) > 1e-9:
            why = caveat(rep.name, cfg.pp, cfg.chunks, d) or "unexplained, please report it"
            mine.append(f"* {NAMES[rep.name]}: bubble {rep.bubble:g} vs formula {t.bubble:g}: {why}")
        if act != t.act:
            mine.append(f"* {NAMES[rep.name]}: peak activations {act} vs {t.act}: with only {cfg.chunks} "
                        "microbatches fewer are in flight than the formula counts")
        notes += mine
        mark = " *" if mine else ""
        lines.append(f"{NAMES[rep.name]:<10}{len(rep.ranks):>8}{rep.makespan:>10g}{rep.bubble:>8g}  "
                     f"{t.bubble_text:<20}{t.bubble:>6g}{f'{params}x':>8}{act:>5}  {t.act_text} = {t.act}" + mark)
    lines += notes + ["", f"{'per rank':<16}{'stages':>8}{'busy':>8}{'bubble':>8}{'act':>5}"]
    for rep in reports:
        for r, rk in enumerate(rep.ranks):
            lines.append(f"{NAMES[rep.name]:<10}{'r' + str(r):>6}{','.join(map(str, rk.stages)):>8}{rk.busy:>8g}"
                         f"{rk.bubble:>8g}{rk.peak_act:>5}")
    print("\n".join(lines))
    if cfg.timeline:
        for rep in reports:
            print("\n" + format_timeline(rep))
    return reports
