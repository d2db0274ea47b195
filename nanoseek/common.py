"""Device, dtype, seeding, printing and timing: the one place that decides them.

Everything that asks "which device?" or "which compute dtype?" calls into this file, so a user
can change the answer in one spot (flags or the NANOSEEK_DTYPE / NANOSEEK_DEVICE env vars).
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch

from .errors import UserError  # noqa: F401  (re-exported: most modules import it from here)




_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16")
    return _DTYPES[name]


def autodetect_device(requested: str | None = None) -> torch.device:
    requested = requested or os.environ.get("NANOSEEK_DEVICE")
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _requested_dtype(requested: str | torch.dtype | None) -> torch.dtype | None:
    """An explicit dtype: the argument, else NANOSEEK_DTYPE (an invalid value names the variable)."""
    if requested:
        return parse_dtype(requested)
    env = os.environ.get("NANOSEEK_DTYPE")
    if not env:
        return None
    try:
        return parse_dtype(env)
    except UserError:
        raise UserError(f"NANOSEEK_DTYPE={env!r}: choose float32, bfloat16 or float16, or unset it to use "
                        "the dtype measured fastest on this host") from None


def compute_dtype(device: torch.device, requested: str | torch.dtype | None = None, hidden: int = 256,
                  tokens: int = 2048) -> torch.dtype:
    """The dtype training and prefill matmuls run in (autocast). Master weights stay fp32 whatever this
    returns. An explicit choice (--dtype, NANOSEEK_DTYPE) wins. Otherwise bf16 on CUDA with bf16
    support; on a CPU, whichever of fp32 and bf16 autocast runs an MLP block of this width faster
    here - measured once per host (`nanoseek.calibrate`), because the answer differs between CPUs
    (bf16 2.1x faster on one AMD EPYC, 0.75x on a Xeon without AMX)."""
    explicit = _requested_dtype(requested)
    if explicit is not None:
        return explicit
    from .calibrate import train_dtype
    return train_dtype(device, hidden, tokens)


def decode_dtypes(device: torch.device, requested: str | torch.dtype | None = None) -> tuple[torch.dtype, ...]:
    """The dtypes the inference runner may compute a decode step's GEMMs in, each GEMM taking the
    fastest one measured here: just the requested one when given (--dtype, NANOSEEK_DTYPE), else
    fp32 and bf16 on a CPU, bf16 on CUDA."""
    explicit = _requested_dtype(requested)
    if explicit is not None:
        return (explicit,)
    if device.type == "cuda":
        return (torch.bfloat16,) if torch.cuda.is_bf16_supported() else (torch.float32,)
    return (torch.float32, torch.bfloat16) if device.type == "cpu" else (torch.float32,)


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast context for `dtype`, or a no-op for fp32."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only, flushed (progress must be visible under pipes and CI)."""
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def progress(iterable=None, total=None, desc=None, disable=None, **kw):
    """A tqdm bar on stderr (rank 0 only); a plain iterator when tqdm is missing."""
    if disable is None:
        disable = rank() != 0 or os.environ.get("NANOSEEK_NO_PROGRESS") == "1"
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable if iterable is not None else range(total or 0)
    return tqdm(iterable, total=total, desc=desc, disable=disable, dynamic_ncols=True,
                file=sys.stderr, **kw)


@contextmanager
def timer(store: dict, key: str):
    """`with timer(t, "gen"): ...` adds the elapsed seconds to t["gen"]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - t0


MALLOC_CHOICES = ("tuned", "system")


def tune_cpu_allocator() -> bool:
    """Keep freed memory for reuse instead of handing it back to the OS, in huge pages (the process's
    entry points call this: `nanoseek ...`, the benchmarks). PyTorch's CPU tensors come from glibc
    malloc, which serves large blocks with fresh mmaps and unmaps them on free, so every step of a
    training loop page-faults its activations in again, 4 KB at a time. Two knobs: glibc's mallopt
    (no mmaps, trim the heap only past 512 MB free) and PyTorch's THP_MEM_ALLOC_ENABLE (large blocks
    advised to use transparent huge pages where the kernel offers them). Measured by
    `benchmarks/bench_allocator.py` (README, "CPU memory"). NANOSEEK_MALLOC=system opts out. Returns
    whether the glibc part applied (False when opted out or off glibc, e.g. macOS or musl)."""
    choice = os.environ.get("NANOSEEK_MALLOC", "").lower() or "tuned"
    if choice not in MALLOC_CHOICES:
        raise UserError(f"NANOSEEK_MALLOC={choice!r}: choose one of {', '.join(MALLOC_CHOICES)} (or leave it unset)")
    if choice == "system":
        return False
    if not os.environ.get("THP_MEM_ALLOC_ENABLE"):          # unset or empty; an explicit 0 stays
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 512 << 20))
    except (OSError, AttributeError):
        return False


def set_threads(n: int | None = None) -> None:
    """Use every core we were given (torch sometimes picks fewer inside containers)."""
    n = n or len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (n or os.cpu_count())
    torch.set_num_threads(max(1, n))


def read_jsonl(path, parse, strict: bool = False, what: str = "lines") -> list:
    """`parse(row)` for every non-empty line of a JSONL file. A malformed line (bad JSON, or `parse`
    raising ValueError/TypeError/KeyError/AttributeError) is reported as file:line and skipped, or
    ends the run with that message when `strict`. No usable line at all is an error."""
    from pathlib import Path
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    items, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(parse(json.loads(line)))
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                msg = f"{path}:{lineno}: {e}"
                if strict:
                    raise UserError(msg) from None
                bad.append(msg)
    for msg in bad[:20]:
        print(f"warning: skipped {msg}", file=sys.stderr)
    if len(bad) > 20:
        print(f"warning: ... and {len(bad) - 20} more malformed lines in {path}", file=sys.stderr)
    if not items:
        raise UserError(f"{path}: no usable {what} ({len(bad)} malformed lines)")
    return items
