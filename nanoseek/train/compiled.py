"""Compiling the training step from outside the model, when the run is long enough to repay it.

Every transformer block (and MTP block) is `torch.compile`d in place (`nn.Module.compile`): inductor
fuses the elementwise work around the GEMMs - norms, RoPE, SwiGLU, dtype casts, residual adds, and
their backward - which an eager CPU step spends a third of its time on. The MoE's data-dependent
parts (routing, the padded expert layout) stay eager between compiled regions. Measured on the
`small` preset, 8 x 256 tokens, bf16 autocast, 2 cores: 0.54 -> 0.41 s per step (1.31x), 48 s to
compile (cold inductor cache).

    compiler = StepCompiler(model, policy="auto", key=...)
    ... after each optimizer step: compiler.after_step(step, max_steps, seconds_this_step)

policy "on" compiles before the first step, "off" never, "auto" (the default) after a few eager
steps once the remaining steps are expected to save at least twice the compile time (compile time:
the last measured one for this model and shape on this host, else COLD_COMPILE_S; saving: the share
of a step that compiling saved the last time on this host, else EXPECTED_GAIN). Compiled and eager
steps round differently in the last bits, so an exactly reproducible run (or an exact resume) wants
the same policy both times: `--compile off`.

What compiling saves depends on the host. On a 2-core AMD EPYC with AVX2 only (no avx512, so fp32:
bf16 ran at 0.04x there) the `small` step is bound by its fp32 GEMMs, which inductor leaves alone:
eager 1,480 and compiled 1,472 tokens/s (`bench_train.py`, 2026-11-27). So "auto" measures the gain
of its first compiled steps; if it is under MIN_GAIN it goes back to the eager blocks for the rest
of the run, and every later run on that host reads the measured gain and never compiles.
"""
from __future__ import annotations

import logging
import time

from .. import calibrate
from ..common import print0

EXPECTED_GAIN = 0.25        # share of an eager step compiling saved (0.54 -> 0.41 s measured above)
MIN_GAIN = 0.05             # a measured gain below this: back to eager (the timing's noise is about this)
COLD_COMPILE_S = 60.0
WARM_STEPS = 3


class StepCompiler:
    def __init__(self, model, policy: str = "auto", key: str = ""):
        if policy not in ("auto", "on", "off"):
            raise ValueError(f"compile policy {policy!r}: choose auto, on or off")
        self.model, self.policy, self.key = model, policy, f"train-compile|{key}"
        self.device = model.device
        self.compiled = False
        self._eager_s: list[float] = []
        self._compiled_s: list[float] = []
        self._compiled_at: float | None = None
        self._padded: list = []          # MoE layers whose expert path compile() set to "padded" (from None)
        if policy == "on":
            self.compile()

    def compile(self) -> None:
        # the expert layout reads its capacity with .item(): a graph break by design (routing stays eager
        # between compiled regions), which dynamo would otherwise report as a 20-line warning mid-run
        logging.getLogger("torch._dynamo.variables.tensor").setLevel(logging.ERROR)
        for block in self.model.blocks():
            # compiled blocks on CPU run the experts as padded batched matmuls: under torch.compile (2.13)
            # the meta kernel of _grouped_mm accepts bf16 only, so an fp32 run would fail to trace (on
            # CUDA grouped GEMMs run in bf16 only, `grouped_gemm_ok`, and stay)
            if getattr(block.ffn, "impl", False) is None and block.ffn.experts.w13.device.type == "cpu":
                self._padded.append(block.ffn)
                block.ffn.impl = "padded"
            block.compile()
        self.compiled = True
        self._compiled_at = time.perf_counter()

    def uncompile(self) -> None:
        """Back to the eager blocks (and their expert paths)."""
        for block in self.model.blocks():
            block._compiled_call_impl = None          # what nn.Module.compile() set
        for ffn in self._padded:
            ffn.impl = None
        self._padded.clear()
        self.compiled = False

    def after_step(self, step: int, max_steps: int, seconds: float) -> None:
        """Call after each step (1-based `step`) with its wall time."""
        if self.compiled:
            if self._compiled_at is not None and self._eager_s:   # the first compiled step: it compiled
                took = max(0.0, seconds - min(self._eager_s))
                calibrate.store(self.device, self.key, round(took, 1))
                print0(f"compiled the training step in {took:.0f} s")
                self._compiled_at = None
            elif self.policy == "auto" and self._eager_s and len(self._compiled_s) < WARM_STEPS:
                self._compiled_s.append(seconds)
                if len(self._compiled_s) == WARM_STEPS:
                    self._judge()
            return
        if self.policy != "auto":
            return
        self._eager_s.append(seconds)
        if len(self._eager_s) < WARM_STEPS or self._compiled_s:     # measured already: stays eager
            return
        expected = calibrate.lookup(self.device, self.key) or COLD_COMPILE_S
        gain = calibrate.lookup(self.device, self.key + "|gain")
        gain = EXPECTED_GAIN if gain is None else gain
        saving = (max_steps - step) * min(self._eager_s) * gain
        if gain >= MIN_GAIN and saving > 2 * expected:
            print0(f"compiling the training step (expected {expected:.0f} s, saves ~{saving:.0f} s over the "
                   f"{max_steps - step} remaining steps; --compile off keeps it eager)")
            self.compile()

    def _judge(self) -> None:
        """The measured gain of the compiled step (fastest of WARM_STEPS steps each way), kept for later
        runs; under MIN_GAIN the rest of this run goes back to eager."""
        gain = round(1 - min(self._compiled_s) / min(self._eager_s), 3)
        calibrate.store(self.device, self.key + "|gain", gain)
        if gain < MIN_GAIN:
            print0(f"compiling saved {100 * gain:.0f}% of a step on this host: back to the eager step (later runs "
                   "here stay eager; --compile on forces it)")
            self.uncompile()
        else:
            print0(f"compiling saved {100 * gain:.0f}% of a step")
