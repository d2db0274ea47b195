"""What runs fastest on this host, measured once and remembered.

The CPU under nanoseek changes from machine to machine, and so does the answer to "fp32 or bf16?":
bf16 autocast trained the `small` preset 2.1x faster than fp32 on a 2-core AMD EPYC and 0.75x on a
Xeon without AMX; MKL's packed fp32 GEMMs paid on that Xeon and not on the EPYC. So no constant
decides: a short measurement on shapes taken from the model does, and its result is cached in
`$NANOSEEK_CACHE_DIR/calibration.json` (default `~/.cache/nanoseek/`), keyed by the CPU (model name
and the flags that matter), the torch version and the thread count.

    train_dtype(device, cfg, tokens)   fp32 or bf16 for autocast training and prefill: an MLP block's
                                       forward + backward at the model's width, timed both ways
    remember(device, key, measure)     any other measurement, e.g. the decode step's fastest GEMM
                                       kernel per shape (`nanoseek.inference.runner.gemm`)

An explicit dtype (`--dtype`, `NANOSEEK_DTYPE`) always wins; `common.compute_dtype` applies it.
Each measurement takes well under a second and prints one line the first time it is made here.
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cache_file() -> Path:
    root = os.environ.get("NANOSEEK_CACHE_DIR") or Path.home() / ".cache" / "nanoseek"
    return Path(root) / "calibration.json"


def cpu_name() -> str:
    """The CPU's model name (as `lscpu` prints it) and the instruction-set flags that change speed."""
    name, flags = platform.processor() or platform.machine(), []
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        words = set(next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), []))
        flags = [f for f in FLAGS if f in words]
    except OSError:
        pass
    return f"{name} [{' '.join(flags)}]"


def host_key(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"{cpu_name()} x{torch.get_num_threads()} threads"
    return f"{what} | torch {torch.__version__}"


def _load() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store(host: str, key: str, value) -> None:
    """Add one entry (read-modify-write, atomic rename; a lost race only costs a re-measurement)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load()
        data.setdefault(host, {})[key] = value
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:          # read-only home: measure again next time
        pass


def _lookup(host: str, key: str):
    return _load().get(host, {}).get(key)


def lookup(device: torch.device, key: str):
    """A value cached for this host (None if never stored)."""
    return _lookup(host_key(device), key)


def store(device: torch.device, key: str, value) -> None:
    """Cache a value measured elsewhere (e.g. how long a decode graph took to compile)."""
    _store(host_key(device), key, value)


def best_time(fn, budget_s: float = 0.05, reps: int = 12) -> float:
    """The fastest of up to `reps` calls (after one warm-up), stopping early after `budget_s`."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + budget_s
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        if time.perf_counter() > t_end:
            break
    return best


def _say(msg: str) -> None:
    print(f"nanoseek: {msg}", file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------
def train_dtype(device: torch.device, hidden: int, tokens: int = 2048) -> torch.dtype:
    """fp32 or bf16 (autocast, fp32 master weights) for training matmuls at this model width."""
    if device.type != "cpu":
        ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if ok else torch.float32
    # rows: as many as the run has, capped so that one fwd+bwd stays ~1.5 GFLOP (a few ms)
    rows = max(64, min(tokens, int(1.5e9 / (24 * hidden * hidden))))
    host, key = host_key(device), f"train|{rows}x{hidden}"
    hit = _lookup(host, key)
    if hit is not None:
        return getattr(torch, hit["dtype"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    w1 = (torch.randn(4 * hidden, hidden, generator=g) * hidden ** -0.5).requires_grad_()
    w2 = (torch.randn(hidden, 4 * hidden, generator=g) * (4 * hidden) ** -0.5).requires_grad_()

    def step(dtype):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = F.linear(F.silu(F.linear(x, w1)), w2)
        y.float().square().mean().backward()
        w1.grad = w2.grad = None

    times = {dt: float("inf") for dt in (torch.float32, torch.bfloat16)}
    for _ in range(2):                      # interleaved: drift hits both
        for dt in times:
            times[dt] = min(times[dt], best_time(lambda: step(dt), budget_s=0.15, reps=4))
    best = min(times, key=times.get)
    ratio = times[torch.float32] / times[torch.bfloat16]
    name = str(best).removeprefix("torch.")
    _store(host, key, {"dtype": name, "bf16_speedup": round(ratio, 2)})
    _say(f"training matmuls in {name} on this host ({cpu_name()}): bf16 autocast ran an MLP block "
         f"({rows} x {hidden}, forward + backward) at {ratio:.2f}x fp32. Measured once, cached in "
         f"{cache_file()}; --dtype or NANOSEEK_DTYPE overrides.")
    return best


def remember(device: torch.device, key: str, measure) -> tuple[object, bool]:
    """(the cached result for `key` on this host, False), or (`measure()`, True) after storing it. For
    measurements other modules own (the decode GEMM kernels), which announce them themselves."""
    host = host_key(device)
    hit = _lookup(host, key)
    if hit is not None:
        return hit, False
    value = measure()
    _store(host, key, value)
    return value, True


def announce(msg: str) -> None:
    """One line on stderr for a choice measured now (later runs read it from the cache silently)."""
    _say(f"{msg} (measured once on {cpu_name()}, cached in {cache_file()})")
