"""Training-state checkpoints: written atomically, verified on load, resumable.

A checkpoint is one torch.save file `OUT/checkpoints/step_000123.pt` holding everything needed to
continue bit-for-bit: model, optimizer, step, data position, RNG states, the run config.

Atomic write: save to `step_000123.pt.tmp`, fsync, rename (POSIX rename is atomic), fsync the
directory, then record the file's SHA-256 in `step_000123.pt.sha256`. A process killed mid-save
leaves only a `.tmp` (ignored and cleaned up). On resume, checkpoints are tried newest first; one
whose checksum does not match or that cannot be read is named in a warning and skipped - never
loaded silently.
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch

from ..common import UserError

_NAME = re.compile(r"step_(\d+)\.pt$")


class CorruptCheckpoint(UserError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep: int = 2) -> Path:
    d = Path(ckpt_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:06d}.pt"
    tmp = final.with_suffix(".pt.tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    os.replace(tmp, final)
    side = final.with_suffix(".pt.sha256")
    side_tmp = side.with_suffix(".sha256.tmp")
    side_tmp.write_text(digest + "\n")
    os.replace(side_tmp, side)
    _fsync_dir(d)
    for old in list_checkpoints(d)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".pt.sha256").unlink(missing_ok=True)
    return final


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Complete checkpoints (with a checksum file), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.glob("step_*.pt") if _NAME.search(p.name) and p.with_suffix(".pt.sha256").exists()]
    return sorted(found, key=lambda p: int(_NAME.search(p.name).group(1)))


def load_checkpoint(path: str | Path) -> dict:
    """Load one checkpoint after verifying its checksum; raises CorruptCheckpoint naming the file."""
    path = Path(path)
    side = path.with_suffix(".pt.sha256")
    if not path.exists():
        raise CorruptCheckpoint(f"checkpoint {path} does not exist")
    if side.exists() and side.read_text().strip() != _sha256(path):
        raise CorruptCheckpoint(f"checkpoint {path} is corrupted (SHA-256 does not match {side.name})")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, unpickling error, ...
        raise CorruptCheckpoint(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None


def load_latest(ckpt_dir: str | Path) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint; corrupted newer ones are reported and skipped."""
    for stale in Path(ckpt_dir).glob("*.tmp") if Path(ckpt_dir).is_dir() else []:
        stale.unlink(missing_ok=True)   # left by a save that was killed
    for path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return load_checkpoint(path), path
        except CorruptCheckpoint as e:
            print(f"warning: {e}; trying an older checkpoint", file=sys.stderr, flush=True)
    return None
