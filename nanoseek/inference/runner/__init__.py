"""The decode runner: the engine's fast decode step, built around the unchanged model.

The model (`nanoseek.model`) is the reference maths for training and prefill. A decode step wants
other things - folded attention weights, fused expert GEMMs, packed weights in whatever dtype this
host multiplies fastest, one compiled graph per batch size - and all of them live here, owned by one
`DecodeRunner` per engine (two runners on two models in one process share nothing), the way
nano-vllm's model_runner owns CUDA graphs around its model and gpt-fast compiles `decode_one_token`
from outside:

    runner = DecodeRunner(model, cache, dtypes=(torch.float32, torch.bfloat16), compile="auto")
    logits, tokens, logps = runner.decode(pending_tokens, lengths)   # one token per running row
    runner.sync_weights()            # after an optimizer step (GRPO calls it); a cheap version check
                                     # before every step catches a missing call

    weights.py  the derived weights (folded MLA, fused MoE, dtype copies, packs) and their sync
    step.py     the forward over them (eager or compiled), tested against the model's forward
    moe.py      the MoE decode paths (gather / fused dense / capacity)
    gemm.py     the GEMM kernels (fp32, MKL-packed fp32, bf16, oneDNN-packed bf16), chosen per GEMM
                shape by measurement (`nanoseek.calibrate`, cached per host)

Compilation. Rows are padded to a power of two (a graph per batch bucket); the attention span (live
cache length rounded up to 32) is the graph's one dynamic dimension, so sequences grow without
recompiles. `compile=True` compiles a bucket on first use, `False` never, and "auto" (the default on
CPU) when it pays: a bucket is compiled once the time spent decoding it eagerly reaches what its
compilation is expected to cost (the last measured compile time for this model and bucket on this
host, 20 s before the first). That never spends more than twice the better of the two choices, and
short jobs (one `generate` call) stay eager. `warmup()` compiles chosen buckets up front (the server
does, at start-up).
"""
from __future__ import annotations

import time
import warnings

import torch

from ... import calibrate
from ...common import progress
from . import gemm
from .step import decode_logits
from .weights import DecodeWeights

SPAN_STEP = 32
COLD_COMPILE_S = 20.0


class DecodeRunner:
    def __init__(self, model, cache, dtypes: tuple[torch.dtype, ...] = (torch.float32,),
                 compile: bool | str = "auto", max_batch: int = 64, cpp_wrapper: bool = True):
        self.model, self.cache, self.max_batch = model, cache, max_batch
        self.device = model.device
        self.kinds = gemm.available(self.device, dtypes)
        self.weights = DecodeWeights(model, self.device, self.kinds)
        if compile == "auto" and self.device.type != "cpu":
            compile = False          # GPU decode is not compiled yet (CUDA graphs belong to the GPU work)
        self.compile = compile
        self.check_versions = True   # the safety net behind sync_weights()
        self._plans: dict[int, dict[str, str]] = {}
        # cpp_wrapper: inductor writes the code that calls the step's ~100 kernels in C++ rather than
        # Python (measured +9% tokens/s at batch 8, +5% at 64), the packed GEMMs then in C++ too
        self._graph = torch.compile(self._step, fullgraph=True, dynamic=None,
                                    options={"cpp_wrapper": cpp_wrapper}) if compile else None
        if compile and any(k in gemm.PACKED for k in self.kinds):
            gemm.load_native()
        self._compiled: set[int] = set()
        self._failed: set[int] = set()
        self._eager_s: dict[int, float] = {}
        self._spans: dict[int, torch.Tensor] = {}
        self.stats = {"compile_s": {}, "eager_steps": 0, "compiled_steps": 0, "syncs": 0}
        if compile:   # one graph per bucket (1, 2, 4, ... max_batch), plus room for other runners
            import torch._dynamo as dynamo
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 4 * (max_batch.bit_length() + 1))

    # ---------------------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Rebuild the derived weights from the model's parameters (after an optimizer step or a load)."""
        self.weights.sync()
        self.stats["syncs"] += 1

    def bucket(self, rows: int) -> int:
        return 1 << (rows - 1).bit_length()

    def plan(self, rows: int) -> dict[str, str]:
        """{GEMM: kernel} for steps of `rows` (a bucket), measured on first use."""
        if rows not in self._plans:
            self._plans[rows] = self.weights.plan(rows)
        return self._plans[rows]

    def decode(self, pending: list[int], lengths: list[int]):
        """One token per running row (slots 0..B-1): row b's `pending` token at position lengths[b].
        -> (logits (B, V) fp32, greedy tokens (B,), their log-probs (B,))."""
        if self.check_versions and self.weights.stale():
            self.sync_weights()
        B = len(pending)
        Bp = self.bucket(B)
        plan = self.plan(Bp)
        if self._should_compile(Bp):
            out = self._run_compiled(Bp, plan, pending, lengths)
            if out is not None:
                return out
        t = time.perf_counter()
        ids = torch.tensor(pending, device=self.device).view(B, 1)
        starts = torch.tensor(lengths, device=self.device)
        with torch.no_grad():
            logits, tokens, best = self._step(ids, starts, None, self.weights.tensors(Bp, plan), plan)
        self.stats["eager_steps"] += 1
        self._eager_s[Bp] = self._eager_s.get(Bp, 0.0) + time.perf_counter() - t
        return logits, tokens, best - torch.logsumexp(logits, dim=-1)

    def warmup(self, buckets: list[int] | None = None, desc: str = "compiling decode") -> None:
        """Compile these batch buckets now (default: all up to max_batch), with a progress bar. The
        engine must be idle: the dummy step writes position 0 of the first slots' cache rows."""
        if self._graph is None:
            return
        buckets = buckets or [1 << i for i in range(self.max_batch.bit_length()) if 1 << i <= self.max_batch]
        for Bp in progress(buckets, desc=desc):
            if Bp not in self._compiled and Bp not in self._failed:
                self._run_compiled(Bp, self.plan(Bp), [0] * Bp, [0] * Bp)

    # ---------------------------------------------------------------------------------------------
    def _step(self, ids, starts, span, W, plan):
        """The step (eager, or traced by torch.compile): logits (B, V) fp32 and the greedy token and its
        logit, fused in-graph."""
        self.cache.begin(starts, ids.shape[1], 0, span=None if span is None else span.shape[0])
        logits = decode_logits(self.model, W, plan, self.cache, ids)[:, -1]
        best, tokens = logits.max(dim=-1)
        return logits, tokens, best

    def _should_compile(self, Bp: int) -> bool:
        if self._graph is None or Bp in self._failed or Bp > self.max_batch:
            return False
        if self.compile is True or Bp in self._compiled:
            return True
        return self._eager_s.get(Bp, 0.0) >= self._expected_compile_s(Bp)

    def _compile_key(self, Bp: int) -> str:
        c = self.model.cfg
        return f"decode-compile|{c.hidden_size}x{c.num_hidden_layers}x{c.n_routed_experts}|{','.join(self.kinds)}|B{Bp}"

    def _expected_compile_s(self, Bp: int) -> float:
        hit = calibrate.lookup(self.device, self._compile_key(Bp))
        return float(hit) if hit is not None else COLD_COMPILE_S

    def _run_compiled(self, Bp: int, plan: dict, pending: list[int], lengths: list[int]):
        B = len(pending)
        # rows B..Bp-1 are free cache slots: their dummy token lands at position 0 and is overwritten
        # by the next prefill that takes the slot. Dummies copy real rows' tokens so that they route
        # like real tokens (identical dummies would all pick the same experts and overflow the
        # capacity path)
        ids = torch.tensor(pending + [pending[i % B] for i in range(Bp - B)], device=self.device).view(Bp, 1)
        starts = torch.tensor(lengths + [0] * (Bp - B), device=self.device)
        S = min(self.cache.max_len, (max(lengths) + SPAN_STEP) // SPAN_STEP * SPAN_STEP)
        span = self._spans.get(S)
        if span is None:     # the span is the length of an empty tensor, marked dynamic
            span = self._spans[S] = torch.empty(S, device=self.device)
            torch._dynamo.mark_dynamic(span, 0)
        torch._dynamo.mark_static(ids, 0)
        torch._dynamo.mark_static(starts, 0)
        first = Bp not in self._compiled
        t = time.perf_counter()
        try:
            with torch.no_grad():
                logits, tokens, best = self._graph(ids, starts, span, self.weights.tensors(Bp, plan), plan)
        except Exception as e:          # a bucket torch cannot compile (limits, backend): run eagerly
            warnings.warn(f"compiled decode failed for batch {Bp} ({type(e).__name__}: {str(e)[:200]}); "
                          "using eager")
            self._failed.add(Bp)
            return None
        if first:
            self._compiled.add(Bp)
            took = round(time.perf_counter() - t, 2)
            self.stats["compile_s"][Bp] = took
            calibrate.store(self.device, self._compile_key(Bp), took)
        self.stats["compiled_steps"] += 1
        # the log-prob's logsumexp runs eagerly: inductor's exp is ~2.5x slower than ATen's here
        # (measured 0.24 ms in-graph vs 0.12 ms eager for 64 x 4096 logits)
        logits = logits[:B]
        return logits, tokens[:B], best[:B] - torch.logsumexp(logits, dim=-1)
