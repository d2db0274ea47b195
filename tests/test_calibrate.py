"""Host calibration (nanoseek/calibrate.py): measured once, cached per host, overridable."""
import json

import pytest
import torch

from nanoseek import calibrate
from nanoseek.common import UserError, compute_dtype, decode_dtypes

CPU = torch.device("cpu")


def test_training_dtype_is_measured_once_then_cached(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("NANOSEEK_DTYPE", raising=False)
    calls = []
    real = calibrate.best_time
    monkeypatch.setattr(calibrate, "best_time", lambda fn, **kw: calls.append(1) or real(fn, **kw))
    first = compute_dtype(CPU, None, hidden=64, tokens=256)
    assert first in (torch.float32, torch.bfloat16) and calls
    said = capsys.readouterr().err
    assert "training matmuls in" in said and "overrides" in said        # the choice is printed once...
    n = len(calls)
    assert compute_dtype(CPU, None, hidden=64, tokens=256) == first and len(calls) == n   # ...then cached
    assert capsys.readouterr().err == ""
    entry = json.loads((tmp_path / "calibration.json").read_text())[calibrate.host_key(CPU)]
    assert entry["train|256x64"]["dtype"] == str(first).removeprefix("torch.")


def test_explicit_dtype_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOSEEK_DTYPE", "bfloat16")
    assert compute_dtype(CPU) == torch.bfloat16 and decode_dtypes(CPU) == (torch.bfloat16,)
    assert compute_dtype(CPU, "float32") == torch.float32 and decode_dtypes(CPU, "fp32") == (torch.float32,)
    assert not (tmp_path / "calibration.json").exists()           # nothing was measured
    monkeypatch.setenv("NANOSEEK_DTYPE", "bf15")
    with pytest.raises(UserError, match="NANOSEEK_DTYPE='bf15'"):
        compute_dtype(CPU)
    monkeypatch.delenv("NANOSEEK_DTYPE")
    assert decode_dtypes(CPU) == (torch.float32, torch.bfloat16)


def test_unwritable_cache_still_answers(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(blocker / "sub"))      # a path under a file: cannot be created
    monkeypatch.delenv("NANOSEEK_DTYPE", raising=False)
    assert compute_dtype(CPU, None, hidden=32, tokens=64) in (torch.float32, torch.bfloat16)


def test_training_compile_policy_waits_until_it_pays(monkeypatch):
    """pretrain --compile auto compiles the blocks only when the remaining steps are expected to save
    at least twice the (cached or cold) compile time; on/off are unconditional."""
    from conftest import random_cfg
    from nanoseek.model import Transformer
    from nanoseek.train import compiled

    monkeypatch.setattr(compiled.calibrate, "lookup",       # 10 s to compile, no gain measured yet
                        lambda device, key: None if key.endswith("|gain") else 10.0)
    model = Transformer(random_cfg())
    short = compiled.StepCompiler(model, "auto", "k")
    for step in range(1, 6):
        short.after_step(step, 100, 0.5)          # 95 steps x 0.5 s x 25% = 12 s < 2 x 10 s
    assert not short.compiled and model.layers[0]._compiled_call_impl is None
    long = compiled.StepCompiler(model, "auto", "k")
    for step in range(1, 6):
        long.after_step(step, 1000, 0.5)          # ~120 s > 20 s
    assert long.compiled and model.layers[0]._compiled_call_impl is not None
    assert not compiled.StepCompiler(Transformer(random_cfg()), "off", "k").compiled
    assert compiled.StepCompiler(Transformer(random_cfg()), "on", "k").compiled


@pytest.mark.parametrize("compiled_s,stays", [(0.5, False), (0.3, True)])
def test_training_compile_policy_measures_the_gain(compiled_s, stays, tmp_path, monkeypatch):
    """auto times its first compiled steps against the eager ones: a gain under MIN_GAIN (a host whose
    step is bound by GEMMs inductor does not touch) goes back to the eager blocks and expert path, and
    the next run on this host reads the measured gain instead of EXPECTED_GAIN."""
    from conftest import random_cfg
    from nanoseek.model import Transformer
    from nanoseek.train import compiled

    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    model = Transformer(random_cfg())
    impls = [b.ffn.impl for b in model.blocks() if hasattr(b.ffn, "impl")]
    c = compiled.StepCompiler(model, "auto", "k")
    steps = [0.5] * 3 + [30.0] + [compiled_s] * 3        # eager, eager, eager, compiling, compiled x 3
    for step, s in enumerate(steps, 1):
        c.after_step(step, 10_000, s)
    assert c.compiled == stays
    assert (model.layers[0]._compiled_call_impl is not None) == stays
    assert stays or [b.ffn.impl for b in model.blocks() if hasattr(b.ffn, "impl")] == impls
    gain = compiled.calibrate.lookup(torch.device("cpu"), "train-compile|k|gain")
    assert gain == pytest.approx(1 - compiled_s / 0.5)
    again = compiled.StepCompiler(Transformer(random_cfg()), "auto", "k")
    for step in range(1, 6):
        again.after_step(step, 10_000, 0.5)
    assert again.compiled == stays


def test_cpu_allocator_tuning_applies_in_a_fresh_process():
    """`nanoseek ...` keeps freed memory and asks PyTorch to back large blocks with huge pages;
    NANOSEEK_MALLOC=system leaves glibc's defaults. Checked in subprocesses (it is process-wide) by the
    kernel's count of huge pages behind a 64 MB tensor, where transparent huge pages are available."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    import ctypes
    try:
        ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("not glibc: the mallopt part does not apply")
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text() or not Path("/proc/self/smaps_rollup").exists():
        pytest.skip("no transparent huge pages on this host")
    code = ("from nanoseek.common import tune_cpu_allocator; import torch; ok = tune_cpu_allocator(); "
            "x = torch.ones(64 << 20, dtype=torch.uint8); "
            "kb = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0]; "
            "print(ok, kb >= 32 << 10)")
    base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "NANOSEEK_MALLOC")}
    run = lambda env: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,  # noqa: E731
                                     env={**base, **env}, timeout=120).stdout.split()
    assert run({}) == ["True", "True"]
    plain = run({"NANOSEEK_MALLOC": "system"})
    assert plain[0] == "False"
    if "[madvise]" in thp.read_text():           # huge pages only where asked for: here, not asked
        assert plain[1] == "False"


def test_unknown_allocator_choice_is_a_clear_error(monkeypatch):
    from nanoseek.common import tune_cpu_allocator
    monkeypatch.setenv("NANOSEEK_MALLOC", "jemalloc")
    with pytest.raises(UserError, match="NANOSEEK_MALLOC='jemalloc': choose one of tuned, system"):
        tune_cpu_allocator()
