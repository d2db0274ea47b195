"""The decode runner: the engine's fast decode step, built around the unchanged model.

The model (`nanoseek.model`) is the reference maths for training and prefill. A decode step wants
other things - folded attention weights, fused expert GEMMs, packed weights in whatever dtype this
host multiplies fastest, one compiled graph per batch size - and all of them live here, owned by one
`DecodeRunner` per engine (two runners on two models in one process share nothing), the way
nano-vllm's model_runner owns CUDA graphs around its model and gpt-fast compiles `decode_one_token`
from outside:

    runner = DecodeRunner(model, cache, dtypes=(torch.float32, torch.bfloat16), compile="auto")
    logits, tokens, logps, h = runner.decode(pending_tokens, lengths)   # one token per running row
    tokens2, logps2, accepted, drafts = runner.speculate(pending, drafts, lengths)   # MTP, speculative.py
    runner.sync_weights()            # after an optimizer step (GRPO calls it); a cheap version check
                                     # before every step catches a missing call

    weights.py  the derived weights (folded MLA, fused MoE, dtype copies, packs) and their sync
    step.py     the forward over them (eager or compiled), tested against the model's forward
    moe.py      the MoE decode paths (gather / fused dense / capacity)
    gemm.py     the GEMM kernels (fp32, MKL-packed fp32, bf16, oneDNN-packed bf16), chosen per GEMM
                shape by measurement (`nanoseek.calibrate`, cached per host); packed_linear.cpp

On CUDA the step compiles the same way and each bucket's graph is captured as CUDA graphs (inductor's
cudagraph trees, one capture per attention span): a decode step is then one graph launch instead
of ~1,000 kernel launches from Python. The derived weights and the cache are marked as static
inputs (graphs read them in place; `sync_weights` writes new values into the same tensors), and
the runner hands out copies of a graph's outputs, which its next replay overwrites.

Compilation. Rows are padded to a power of two (a graph per batch bucket); the attention span (live
cache length rounded up to 32) is the graph's one dynamic dimension, so sequences grow without
recompiles. `compile=True` compiles a bucket on first use, `False` never, and "auto" (the default, on
CPU and CUDA) when it pays. The expected cost of compiling a bucket is the last measured compile time for this
model and bucket on this host (COLD_COMPILE_S before the first, CUDA_COLD_COMPILE_S on a GPU; graphs load from inductor's disk cache
in a later process, ~6 s for batch 64 of the benchmark model against ~19 s cold). Without knowing how
long the job runs, a bucket is compiled once the time spent decoding it eagerly reaches that cost (the
ski-rental rule: never more than twice the better of the two choices; one `generate` call stays
eager). A caller that knows (`horizon` = (units done, units in the job, phase): GRPO's steps) gets
another rule instead: compile once the eager time per unit so far, times the units left, times
COMPILED_SAVES, exceeds twice the cost (the margin the training-step compiler uses: the saving is an
estimate, and a job's batches shrink into other buckets as sequences finish). A short run never
compiles; a long one compiles after its first units. (Without the margin, the main job's 40 GRPO
steps compiled their rollout buckets cold at step 2 and its RL phase took 121 instead of 72 s.)
The saving is measured too (CPU): once a bucket has run SAVES_STEPS compiled steps after eager ones,
1 - compiled / eager time per step is stored per host, and later processes use it instead of
COMPILED_SAVES / CUDA_COMPILED_SAVES (on an AVX2-only AMD EPYC the benchmark model's compiled steps saved 0.32 / 0.44 /
0.59 at batch 64 / 8 / 1, against the Xeon's 0.51 / 0.61 / 0.71).
`warmup()` compiles chosen buckets up front (the server does, at start-up).

MoE capacity. A compiled step cannot size its capacity-path MoE buffers to the step's loads; it gets
a fixed number of rows per expert, 2x the mean load (moe.py), and an expert given more pairs makes the
runner redo the step eagerly. A trained router can be far from balanced: on bench_grpo's model the
busiest expert overflowed 2x the mean in 431 of 756 eager layer-steps above 16 rows (mostly batch 64),
and its compiled rollouts took 2.6-2.8 s against 1.7 s eager (AVX2 EPYC). So every step records each capacity-path layer's
busiest-expert load (eager steps too, scaled to the bucket's padded rows), and once FIT_STEPS are seen,
a bucket about to compile or one that just overflowed gets its capacities fitted (`_fit_capacities`):
a layer that needs more than 2x the mean takes the fused dense path where it exists (about as fast as
the capacity path's larger buffers, and it cannot overflow; the bucket's eager steps take it too
where their median load needs more than 2x the mean),
else a capacity that holds all but OVERFLOW_SHARE of the loads seen. The plan changes and the bucket
compiles once more (from inductor's disk cache in a later process, but the fit itself is redone per
process: a server that warmed its buckets up compiles a refitted one while serving). There the same
rollouts took 0.9-1.3 s.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import math
import time
import warnings
from pathlib import Path

import torch

from ... import calibrate
from ...common import progress
from ...quant.fp8_weights import holds_fp8_weights
from . import gemm
from . import moe as moe_paths
from .step import decode_head, decode_hidden, greedy, speculate
from .weights import DecodeWeights

SPAN_STEP = 32
COLD_COMPILE_S = 20.0
# share of an eager step's time the compiled step saves: 0.51 / 0.61 / 0.71 at batch 64 / 8 / 1
# (bench_decode.py, benchmark model, 2-core Xeon: 7,677 -> 15,575, 1,915 -> 4,888, 307 -> 1,071 tok/s).
COMPILED_SAVES = 0.5
# The priors on CUDA, from one H200 (bench_gpu.py run 1, the 8.5M benchmark model): a bucket compiled
# and captured in 7.6-10.0 s, and the CUDA graphs saved 0.85-0.9 of an eager step (eager steps there are
# bound by launching kernels). With the CPU priors the main job's GRPO rollouts on that GPU never
# compiled (40 steps judged too few).
CUDA_COLD_COMPILE_S = 10.0
CUDA_COMPILED_SAVES = 0.85
SAVES_STEPS = 32          # compiled steps of a bucket (after eager ones) before its saving is stored
FIT_STEPS = 32            # observed loads of an MoE layer before a compiled step's capacity is fitted to them


@functools.cache
def traced_code_version() -> str:
    """A hash of the source the compiled step traces (the runner, the cache, the model, quantization)."""
    root = Path(__file__).resolve().parents[2]
    files = sorted([*root.glob("inference/runner/*.py"), root / "inference/cache.py", *root.glob("model/*.py"),
                    *root.glob("quant/*.py")])
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


class DecodeRunner:
    def __init__(self, model, cache, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                 compile: bool | str = "auto", max_batch: int = 64, cpp_wrapper: bool = True):
        """A model with e4m3 weights (`quant.fp8_weights.quantize_weights`) decodes with the fp8 GEMM kind alone:
        the derived weights stay e4m3 as well."""
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.device = model.device
        fp8_weights = holds_fp8_weights(model)
        self.kinds = ["fp8"] if fp8_weights else gemm.available(self.device, dtypes)
        if compile == "auto" and self.device.type not in ("cpu", "cuda"):
            compile = False
        self.cuda_graphs = bool(compile) and self.device.type == "cuda" and not fp8_weights
        self.weights = DecodeWeights(model, self.device, self.kinds, in_place=self.cuda_graphs)
        if fp8_weights:
            # inductor (torch 2.13, CPU) miscompiles the block-scale dequantization inside the step:
            # measured wrong values (up to 1e35) in every column block after the first of a (48, 216)
            # weight, while the same function compiled alone is exact. The fp8 step runs eagerly.
            compile = False
        self.compile = compile
        if self.cuda_graphs:     # the cache stays where it is (the weights: DecodeWeights.tensors marks them)
            for t in [cache.data] + ([cache.scale] if cache.scale is not None else []):
                torch._dynamo.mark_static_address(t, guard=False)
        self.check_versions = True   # the safety net behind sync_weights()
        self._plans: dict[tuple[int, bool], dict[str, str]] = {}
        self._eager_plans: dict[tuple[int, bool], dict[str, str]] = {}
        self._load_steps: dict[int, int] = {}                   # steps whose loads were noted, by rows
        self._fit_at: dict[tuple[int, bool], int] = {}          # _load_steps at a plan's last fit
        # the busiest expert's load per step, by (step rows, MoE layer): what a compiled step's
        # capacity is fitted to (module docstring)
        self._loads: dict[tuple[int, int], collections.deque] = {}
        # one compiled function per kind of step; inside each, one graph per batch bucket.
        # cpp_wrapper: inductor writes the code that calls the step's ~100 kernels in C++ rather than
        # Python (measured +9% tokens/s at batch 8, +5% at 64), the packed GEMMs then in C++ too
        steps = {"decode": self._decode_step, "spec": self._spec_step}
        options = {"triton.cudagraphs": True} if self.cuda_graphs else {"cpp_wrapper": cpp_wrapper}
        self._graphs = {k: torch.compile(f, fullgraph=True, dynamic=None, options=options)
                        for k, f in steps.items()} if compile else {}
        if compile and any(k in gemm.PACKED for k in self.kinds):
            gemm.load_native()
        self._compiled: set[tuple[str, int]] = set()
        self._checked: set[tuple[str, int]] = set()     # graphs whose guards passed since the last sync
        self._failed: set[tuple[str, int]] = set()
        self._refitted: set[tuple[str, int]] = set()    # capacities raised: the next step compiles
        self._expected_s: dict[tuple[str, int], float] = {}   # expected compile time, read from disk once
        # (units done, units in the job, phase), if the caller knows. Eager seconds are kept per
        # (phase, kind, bucket), phase None without a horizon, so that e.g. GRPO's evaluations and
        # training rollouts each judge their own future
        self.horizon: tuple[int, int, str] | None = None
        self._eager_s: dict[tuple[str | None, str, int], float] = {}
        self._eager_n: dict[tuple[str, int], int] = {}                 # eager steps per (kind, bucket)
        self._compiled_t: dict[tuple[str, int], list] = {}            # [seconds, steps] after the first
        self._saves: dict[tuple[str, int], float] = {}                # measured saving, read from disk once
        self._spans: dict[int, torch.Tensor] = {}
        self.stats = {"compile_s": {}, "eager_steps": 0, "compiled_steps": 0, "syncs": 0,
                      "overflow_reruns": 0, "capacity": {}}
        if compile:   # graphs per bucket (1, 2, 4, ... max_batch) and step kind, plus room for other runners
            import torch._dynamo as dynamo
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 4 * (max_batch.bit_length() + 1))

    # ---------------------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Rebuild the derived weights from the model's parameters (after an optimizer step or a load)."""
        self.weights.sync()
        self._checked.clear()
        self.stats["syncs"] += 1

    def bucket(self, rows: int) -> int:
        return 1 << (rows - 1).bit_length()

    def plan(self, rows: int, spec: bool = False) -> dict:
        """{GEMM: kernel, ...} for steps of `rows` rows (see DecodeWeights.plan), measured on first use,
        and for a compiled step each capacity-path MoE layer's rows per expert, "moe{i}.capacity"."""
        if (rows, spec) not in self._plans:
            plan = self.weights.plan(rows, mtp=spec)
            self._eager_plans[(rows, spec)] = dict(plan)
            for i in moe_paths.layers_on(plan, "capacity"):
                plan[f"moe{i}.capacity"] = self._default_capacity(i, rows)
            self._plans[(rows, spec)] = plan
        return self._plans[(rows, spec)]

    def _default_capacity(self, i: int, rows: int) -> int:
        """MoE layer i's compiled capacity before any loads are seen (`moe_paths.capacity`); i may be an
        MTP block's index (speculative plans)."""
        return moe_paths.capacity(dict(self.weights.blocks)[i].ffn, rows, self.device.type)

    def decode(self, pending: list[int], lengths: list[int]):
        """One token per running row (slots 0..B-1): row b's `pending` token at position lengths[b].
        -> (logits (B, V) fp32, greedy tokens (B,), their log-probs (B,), hidden states (B, D))."""
        return self._run("decode", pending, lengths, self.bucket(len(pending)), 1)

    def speculate(self, pending: list[int], drafts: list[int], lengths: list[int]):
        """MTP speculative step (speculative.py): verify [pending, draft] at positions L, L+1 and draft
        the next token. -> (main greedy tokens (B, 2), their log-probs (B, 2), accepted (B,), drafts (B,))."""
        return self._run("spec", [t for pd in zip(pending, drafts) for t in pd], lengths,
                         self.bucket(2 * len(pending)) // 2, 2)

    def warmup(self, buckets: list[int] | None = None, desc: str = "compiling decode", spec: bool = False) -> None:
        """Compile these batch buckets now (default: all up to max_batch), with a progress bar. The
        engine must be idle: the dummy step writes the first positions of the first slots' cache rows."""
        if not self._graphs:
            return
        buckets = buckets or [1 << i for i in range(self.max_batch.bit_length()) if 1 << i <= self.max_batch]
        kind, T = ("spec", 2) if spec else ("decode", 1)
        for Bp in progress([b for b in buckets if b <= self.max_batch], desc=desc):
            if (kind, Bp) not in self._compiled and (kind, Bp) not in self._failed:
                self._run(kind, [0] * (T * Bp), [0] * Bp, Bp, T, force=True)

    # ---------------------------------------------------------------------------------------------
    def _decode_step(self, ids, starts, span, W, plan, flags=None):
        """logits (B, V) fp32, the greedy token and its log-prob fused in, and the hidden state before the
        final norm (B, D) (a speculative engine's MTP draft reads it). `flags`: see `moe_decode`."""
        self.cache.begin(starts, ids.shape[1], 0, span=None if span is None else span.shape[0])
        h = decode_hidden(self.model, W, plan, self.cache, self.model.embed(ids).float(), flags=flags)[:, -1]
        logits = decode_head(self.model, W, plan, h)
        return (logits, *greedy(logits), h)

    def _spec_step(self, ids, starts, span, W, plan, flags=None):
        self.cache.begin(starts, ids.shape[1], 0, span=None if span is None else span.shape[0])
        return speculate(self.model, W, plan, self.cache, ids, flags)

    def _run(self, kind: str, ids: list[int], lengths: list[int], Bp: int, T: int, force: bool = False):
        """Run a step on B = len(lengths) rows of T tokens each (`ids` row-major): compiled (padded to Bp
        rows) when the compile policy says so and the graph builds, else eagerly."""
        if self.check_versions and self.weights.stale():
            self.sync_weights()
        plan = self.plan(Bp * T, spec=kind == "spec")
        key = (kind, Bp)
        if key not in self._compiled:     # (a compiled graph's plan is refitted only after an overflow)
            self._fit_capacities(key, T, plan)     # before the policy prices the graph it would compile
        go = bool(self._graphs) and key not in self._failed and Bp <= self.max_batch and \
            (force or self.compile is True or key in self._compiled or self._pays(key))
        if go:
            out = self._run_compiled(key, T, ids, lengths, self.weights.tensors(Bp * T, plan), plan)
            if out is not None:
                return out
        return self._run_eager(key, ids, lengths, T)

    def _run_eager(self, key: tuple[str, int], ids, lengths, T: int, note_loads: bool = True):
        t = time.perf_counter()
        fn = self._decode_step if key[0] == "decode" else self._spec_step
        plan = self._eager_plans[(key[1] * T, key[0] == "spec")]     # no fixed capacities
        W = self.weights.tensors(key[1] * T, plan)
        loads: list[torch.Tensor] = []
        with torch.no_grad():
            out = fn(torch.tensor(ids, device=self.device).view(-1, T), torch.tensor(lengths, device=self.device),
                     None, W, plan, loads)
        if loads and note_loads:    # as the bucket's padded step would see them: its dummy rows copy real rows
            scale = key[1] / len(lengths)
            self._note_loads(key[1] * T, plan, [math.ceil(x * scale) for x in torch.stack(loads).tolist()])
        self.stats["eager_steps"] += 1
        ekey = (self.horizon[2] if self.horizon else None, *key)
        self._eager_s[ekey] = self._eager_s.get(ekey, 0.0) + time.perf_counter() - t
        self._eager_n[key] = self._eager_n.get(key, 0) + 1
        return out

    def _run_compiled(self, key: tuple[str, int], T: int, ids: list[int], lengths: list[int], W, plan):
        """The compiled graph of bucket key = (kind, Bp), or None (with a warning) where it cannot build."""
        kind, Bp = key
        B = len(lengths)
        # rows B..Bp-1 are free cache slots: their dummy tokens land at positions 0.. and are overwritten
        # by the next prefill that takes the slot. Dummy row i copies row i % B, so that dummies route
        # like real tokens (identical dummies would all pick the same experts and overflow the capacity path)
        padded = ids + (ids * (Bp // B))[: T * (Bp - B)]
        t_ids = torch.tensor(padded, device=self.device).view(Bp, T)
        starts = torch.tensor(lengths + [0] * (Bp - B), device=self.device)
        S = min(self.cache.max_len, (max(lengths) + T - 1 + SPAN_STEP) // SPAN_STEP * SPAN_STEP)
        span = self._spans.get(S)
        if span is None:     # the span is the length of an empty tensor, marked dynamic
            span = self._spans[S] = torch.empty(S, device=self.device)
            torch._dynamo.mark_dynamic(span, 0)
        torch._dynamo.mark_static(t_ids, 0)
        torch._dynamo.mark_static(starts, 0)
        first = key not in self._compiled or key in self._refitted
        self._refitted.discard(key)
        # Dynamo checks ~100 guards per call (~0.1 ms, 7% of a batch-8 step). Once this bucket's graph
        # passed them since the last sync, every input is the same kind of tensor (the runner makes them
        # all), so only the guards that tell graphs apart are evaluated
        stance = torch.compiler.set_stance("default", skip_guard_eval_unsafe=key in self._checked)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        t = time.perf_counter()
        flags: list[torch.Tensor] = []
        try:
            with torch.no_grad(), stance:
                out = self._graphs[kind](t_ids, starts, span, W, plan, flags)
        except Exception as e:          # a bucket torch cannot compile (limits, backend): run eagerly
            warnings.warn(f"compiled {kind} step failed for batch {Bp} ({type(e).__name__}: {str(e)[:200]}); "
                          "running it eagerly")
            self._failed.add(key)
            return None
        if first:
            self._compiled.add(key)
            took = round(time.perf_counter() - t, 2)
            self.stats["compile_s"][f"{kind}{Bp}"] = took
            calibrate.store(self.device, self._compile_key(kind, Bp), took)
            self._expected_s[key] = took
        elif self.device.type == "cpu" and self._eager_n.get(key):    # (a CUDA graph replay returns early)
            self._note_compiled_step(key, time.perf_counter() - t)
        self._checked.add(key)
        self.stats["compiled_steps"] += 1
        if flags and self._note_loads(Bp * T, plan, torch.stack(flags).tolist()):
            # an expert got more pairs than the capacity path holds: redo the step eagerly, exactly
            # (it rewrites the same cache positions), and fit the capacities to the loads seen so far
            self.stats["overflow_reruns"] += 1
            out = self._run_eager(key, ids, lengths, T, note_loads=False)
            self._fit_capacities(key, T, plan, overflowed=True)
            return out
        # a CUDA graph's outputs live in its memory pool and its next replay overwrites them
        return tuple(o[:B].clone() if self.cuda_graphs else o[:B] for o in out)

    def _note_loads(self, rows: int, plan: dict, loads: list[int]) -> bool:
        """Record a step's busiest-expert loads (one per capacity-path layer of the `plan` it ran);
        -> did one exceed its layer's compiled capacity?"""
        over = False
        self._load_steps[rows] = self._load_steps.get(rows, 0) + 1
        for i, load in zip(moe_paths.layers_on(plan, "capacity"), loads):   # (the order a step appends them)
            self._loads.setdefault((rows, i), collections.deque(maxlen=8 * FIT_STEPS)).append(load)
            over |= load > plan.get(f"moe{i}.capacity", rows)
        return over

    def _fit_capacities(self, key: tuple[str, int], T: int, plan: dict, overflowed: bool = False) -> None:
        """Fit each capacity-path layer's compiled capacity to its observed loads (`fit_capacity`), once
        FIT_STEPS loads are seen: raised where more than OVERFLOW_SHARE of them would overflow it, and a
        layer that needs more than the default (2x the mean load) takes the fused dense path instead
        where it exists: the capacity path does its rows' FLOPs in more, smaller ops (per compiled layer
        1157 vs dense's 1364 us at 64 rows and 2x the mean: at ~2.4x they would be even; on
        bench_grpo's model at batch 64, rollouts of 1.35 s with fitted capacities, 1.1 s dense).
        A change rewrites the plan, which the compiled step guards on: the bucket's next step compiles
        a graph for it."""
        rows, spec = key[1] * T, key[0] == "spec"
        seen_steps = self._load_steps.get(rows, 0)
        if not overflowed and seen_steps - self._fit_at.get((rows, spec), -FIT_STEPS) < FIT_STEPS:
            return                        # (eager steps call this each time: refit every FIT_STEPS steps)
        self._fit_at[(rows, spec)] = seen_steps
        caps = {}
        eager_plan = self._eager_plans[(rows, spec)]
        # layers already on the dense path (a fit's earlier moves; passed back, any dense layer stays)
        dense, eager_dense = set(moe_paths.layers_on(plan, "dense")), set(moe_paths.layers_on(eager_plan, "dense"))
        before, eager_before = len(dense), len(eager_dense)
        for i in moe_paths.layers_on(plan, "capacity"):     # the compiled graph must hold the loads' tail
            C = C0 = plan[f"moe{i}.capacity"]
            seen = self._loads.get((rows, i), ())
            if len(seen) >= FIT_STEPS:
                C = moe_paths.fit_capacity(list(seen), C0, moe_paths.round8(rows))
            if C > self._default_capacity(i, rows) and self.weights.has_dense(i):
                dense.add(i)
            caps[i] = C
        # an eager step sizes itself to its own load, so its cost follows the typical load: the dense
        # path's two GEMMs beat the capacity path's scatter, batched matmuls and gather once the median
        # step needs more than 2x the mean (bench_grpo's rollouts, eager, alternated in one process:
        # 1.80 vs 1.90 s; the main job's RL model, median 1.9x, p98 2.8-3.8x at 128 rows: 0.78 vs
        # 0.76 s with all-dense, so it stays; AVX2 EPYC)
        for i in moe_paths.layers_on(eager_plan, "capacity"):
            seen = self._loads.get((rows, i), ())
            if len(seen) >= FIT_STEPS and self.weights.has_dense(i) and \
                    moe_paths.fit_capacity(list(seen), 0, moe_paths.round8(rows), share=0.5) > self._default_capacity(i, rows):
                eager_dense.add(i)                          # (share 0.5: the median load, rounded up)
        if len(eager_dense) > eager_before:
            self._eager_plans[(rows, spec)] = self.weights.plan(rows, mtp=spec, dense=frozenset(eager_dense))
        if len(dense) == before and all(caps[i] == plan[f"moe{i}.capacity"] for i in caps):
            return
        if len(dense) > before:
            new = self.weights.plan(rows, mtp=spec, dense=frozenset(dense))
            plan.clear()
            plan.update(new)
        for i in moe_paths.layers_on(plan, "capacity"):
            plan[f"moe{i}.capacity"] = caps[i]
        self.stats["capacity"][f"{key[0]}{key[1]}"] = {
            i: plan.get(f"moe{i}.capacity", plan[f"moe{i}.path"]) for i in sorted(caps)}
        self._checked.discard(key)           # every guard is evaluated: the new plan misses them
        self._refitted.add(key)              # and the next step is timed as a compile
        self._expected_s.pop(key, None)      # of another graph (_compile_key)
        self._saves.pop(key, None)

    def _pays(self, key: tuple[str, int]) -> bool:
        """The "auto" policy (module docstring): is compiling bucket `key` now expected to pay?"""
        cost = self._expected_compile_s(*key)
        if self.horizon is None:
            return self._eager_s.get((None, *key), 0.0) >= cost
        done, total, phase = self.horizon
        spent = self._eager_s.get((phase, *key), 0.0)
        return done > 0 and spent / done * (total - done) * self._expected_saves(*key) > 2 * cost

    def _note_compiled_step(self, key: tuple[str, int], seconds: float) -> None:
        """Time a compiled step; after SAVES_STEPS of them, store the saving against this bucket's
        eager steps for later processes (module docstring)."""
        acc = self._compiled_t.setdefault(key, [0.0, 0])
        acc[0] += seconds
        acc[1] += 1
        if acc[1] == SAVES_STEPS:
            eager = sum(v for k, v in self._eager_s.items() if k[1:] == key) / self._eager_n[key]
            saves = round(max(0.0, 1 - acc[0] / acc[1] / eager), 3)
            calibrate.store(self.device, self._compile_key(*key) + "|saves", saves)

    def _expected_saves(self, kind: str, Bp: int) -> float:
        """The share of an eager step a compiled one saved the last time on this host (COMPILED_SAVES
        before it was measured)."""
        if (kind, Bp) not in self._saves:
            hit = calibrate.lookup(self.device, self._compile_key(kind, Bp) + "|saves")
            prior = CUDA_COMPILED_SAVES if self.device.type == "cuda" else COMPILED_SAVES
            self._saves[(kind, Bp)] = float(hit) if hit is not None else prior
        return self._saves[(kind, Bp)]

    def _compile_key(self, kind: str, Bp: int) -> str:
        """Per model shape, kernels, bucket and version of the traced code: a measured compile time
        is mostly inductor loading its cached graph, which a code change invalidates (once, after an
        edit to the MoE code, `bench_grpo.py --steps 12` compiled its batch-64 bucket on the strength
        of a time measured with the cache warm, compiled cold instead, and averaged 2.93 s of rollout
        per step against ~0.7 s: 0.71x TRL instead of ~2.2x)."""
        c = self.model.cfg
        # and its MoE layers' paths and capacities, which a router's loads change (`_fit_capacities`):
        # a time measured for another graph says nothing (a time from a warm cache once made
        # bench_grpo.py compile its fitted batch-64 graph cold, 46 s, inside a 12-step run)
        plan = self._plans.get((Bp * (2 if kind == "spec" else 1), kind == "spec"), {})
        moe = ",".join(f"{k[3:-5]}:{plan.get(k[:-5] + '.capacity', v)}" for k, v in plan.items()
                       if k.endswith(".path"))
        return (f"{kind}-compile|{c.hidden_size}x{c.num_hidden_layers}x{c.n_routed_experts}|"
                f"{','.join(self.kinds)}|B{Bp}|{moe}|{traced_code_version()}")

    def _expected_compile_s(self, kind: str, Bp: int) -> float:
        """The last measured compile time of this graph on this host (COLD_COMPILE_S before the first),
        looked up once: the eager steps that consult it are a hot path."""
        if (kind, Bp) not in self._expected_s:
            hit = calibrate.lookup(self.device, self._compile_key(kind, Bp))
            prior = CUDA_COLD_COMPILE_S if self.device.type == "cuda" else COLD_COMPILE_S
            self._expected_s[(kind, Bp)] = float(hit) if hit is not None else prior
        return self._expected_s[(kind, Bp)]
