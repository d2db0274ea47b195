"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards
in parallel, and a checkpoint saved on N ranks resumes on M ranks with another layout.

    OUT/checkpoints/step_000120/      DCP files (model + AdamW state, keyed by the full model's
                                      parameter names) and train_state.pt (step, data position, RNG,
                                      run config), then a COMPLETE marker written last

What makes resharding work: FSDP2 parameters are DTensors already; the routed experts under EP are
plain local slices, so for saving and loading they are wrapped as DTensors sharded over ep (rows of
the expert stack) and replicated over edp; pipeline ranks hold disjoint parameter names. DCP then
plans, for the loading layout, which saved pieces each rank reads. Replicated tensors are written
once.

`export_full_state_dict` gathers the whole model onto rank 0 (FSDP shards, EP slices, pipeline
stages), where the trainer writes it in the HF format the rest of the project reads.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .expert_parallel import expert_modules
from .mesh import Dist

COMPLETE = "COMPLETE"


def _placements(par) -> dict[str, torch.Tensor | None]:
    """Parameter name -> phy2log of its expert stack (None for the default placement)."""
    out = {}
    for name, m in expert_modules(par.model).items():
        perm = None if torch.equal(m.phy2log, torch.arange(m.phy2log.numel())) else m.phy2log
        out[f"{name}.w13"] = out[f"{name}.w2"] = perm
    return out


def _gather_rows(t: torch.Tensor, d: Dist) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(d.layout.ep)]
    dist.all_gather(parts, t.contiguous(), group=d.group("ep"))
    return torch.cat(parts)


def _logical_rows(t: torch.Tensor, phy2log: torch.Tensor, d: Dist) -> torch.Tensor:
    """This rank's physical expert rows -> the rows of its logical chunk (experts r*El .. (r+1)*El-1)."""
    phys = _gather_rows(t, d)
    logical = torch.empty_like(phys)
    logical[phy2log] = phys
    El = t.shape[0]
    return logical[d.ep_rank * El:(d.ep_rank + 1) * El].clone()


def _physical_rows(chunk: torch.Tensor, phy2log: torch.Tensor, d: Dist) -> torch.Tensor:
    El = chunk.shape[0]
    return _gather_rows(chunk, d)[phy2log[d.ep_rank * El:(d.ep_rank + 1) * El]]


def _wrap_experts(sd: dict, par, loading: bool, fixups: list) -> dict:
    """Expert slices -> DTensors over (edp, ep): Replicate, Shard(0), in logical expert order. With the
    default placement the wrapper shares the slice's storage (loading fills it in place); with an EPLB
    permutation the rows are exchanged over ep (`fixups` collects the copies to make after a load)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    d = par.d
    mesh, ep = d.emesh["edp", "ep"], d.layout.ep
    perms = _placements(par)

    def wrap(t, perm):
        if perm is not None:
            if loading:
                buf = torch.empty_like(t)
                fixups.append((t, buf, perm))
                t = buf
            else:
                t = _logical_rows(t, perm, d)
        shape = torch.Size((t.shape[0] * ep, *t.shape[1:]))
        return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
    out = dict(sd)
    for n in par.expert_names:
        if n in out:
            v, perm = out[n], perms[n]
            out[n] = {k: wrap(x, perm) if torch.is_tensor(x) and x.dim() > 0 else x for k, x in v.items()} \
                if isinstance(v, dict) else wrap(v, perm)
    return out


def _unwrap(sd: dict, names: list[str], swap: dict) -> dict:
    """DTensor wrappers -> local tensors (a permuted placement's read buffer -> the slice it was copied to)."""
    def local(x):
        x = x.to_local() if hasattr(x, "to_local") else x
        return swap.get(x.data_ptr(), x)
    out = dict(sd)
    for n in names:
        if n in out:
            v = out[n]
            out[n] = {k: local(x) for k, x in v.items()} if isinstance(v, dict) else local(v)
    return out


def _states(model: nn.Module, opt, par, loading: bool = False):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    names = par.expert_names if par is not None else []
    fixups: list = []
    if names:
        msd = _wrap_experts(msd, par, loading, fixups)
        osd = dict(osd)
        osd["state"] = _wrap_experts(osd["state"], par, loading, fixups)
    return msd, osd, names, fixups


def save(path: Path, model: nn.Module, opt, par, train_state: dict, keep: int = 2) -> Path:
    """Write a DCP checkpoint of this step (collective: every rank calls it)."""
    path = Path(path)
    msd, osd, _, _ = _states(model, opt, par)
    if dist.get_rank() == 0 and (path / COMPLETE).exists():    # overwriting: not complete until rewritten
        (path / COMPLETE).unlink()
    dist.barrier()
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        torch.save(train_state, path / "train_state.pt")
        (path / COMPLETE).write_text("")
        done = sorted(p for p in path.parent.glob("step_*") if (p / COMPLETE).exists())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def latest(ckpt_dir: Path, agree: bool = False) -> Path | None:
    """The newest complete checkpoint; `agree`: rank 0's answer on every rank (ranks on other machines
    may list a shared directory differently)."""
    done = sorted(p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and (p / COMPLETE).exists())
    found = [str(done[-1]) if done else None]
    if agree and dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    return Path(found[0]) if found[0] else None


def load(path: Path, model: nn.Module, opt, par) -> dict:
    """Load a DCP checkpoint saved under any layout into this layout's model and optimizer (in place);
    returns the train state (step, data position, RNG, config)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    msd, osd, names, fixups = _states(model, opt, par, loading=True)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path))
    with torch.no_grad():
        for dest, buf, perm in fixups:          # logical rows read from the checkpoint -> this placement
            dest.copy_(_physical_rows(buf, perm, par.d))
    swap = {buf.data_ptr(): dest for dest, buf, _ in fixups}
    if names:
        msd = _unwrap(msd, names, swap)
        osd = dict(osd)
        osd["state"] = _unwrap(osd["state"], names, swap)
    built = [g.get("foreach") for g in opt.param_groups]
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    for g, foreach in zip(opt.param_groups, built):    # an implementation choice of this layout, not state
        g["foreach"] = foreach
    return torch.load(Path(path) / "train_state.pt", weights_only=False)


@torch.no_grad()
def export_full_state_dict(model: nn.Module, par) -> dict | None:
    """The full model's state dict on rank 0 (None elsewhere); collective."""
    d = par.d
    perms = _placements(par)
    sd = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        elif k in par.expert_names and d.layout.ep > 1:
            v, perm = _gather_rows(v, d), perms[k]
            if perm is not None:
                logical = torch.empty_like(v)
                logical[perm] = v
                v = logical
        sd[k] = v.detach().cpu()
    if d.layout.pp == 1:
        return sd if d.rank == 0 else None
    gathered = [None] * dist.get_world_size() if d.rank == 0 else None
    dist.gather_object(sd if d.dp_rank == 0 else None, gathered, dst=0)
    if d.rank != 0:
        return None
    full = {}
    for part in gathered:
        full.update(part or {})
    return full


# -------------------------------------------------------------------------------------------------
# `nanoseek export`: a DCP checkpoint (any layout) -> an HF-format model directory, in one process

def to_hf(path: str | Path, out: str | Path, fp8: bool = False) -> Path:
    """Read the model part of a DCP checkpoint (a step directory, or a run directory: its newest
    checkpoint) into a full single-device model and write it with `save_pretrained`."""
    from ..checkpoint.hf import save_pretrained
    from ..common import UserError
    from ..config import ModelConfig
    from ..model import Transformer

    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = latest(path / "checkpoints") or path
    if not (path / COMPLETE).exists() or not (path / "train_state.pt").exists():
        raise UserError(f"{path}: not a complete distributed checkpoint (a step_NNNNNN directory with "
                        f"{COMPLETE} and train_state.pt, or a run directory holding checkpoints/)")
    state = torch.load(path / "train_state.pt", weights_only=False)
    mcfg = ModelConfig(**state["model_config"])
    model = Transformer(mcfg)
    if state["config"].get("fp8"):
        from ..quant.fp8 import convert
        convert(model)
    sd = model.state_dict()
    with warnings.catch_warnings():       # DCP warns that no process group exists: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)     # one process reads every shard
    model.load_state_dict(sd)
    tok = None
    tok_dir = path.parent.parent / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer
        tok = Tokenizer.load(tok_dir)
    save_pretrained(model.eval(), out, tokenizer=tok, fp8=fp8)
    return Path(out)


def main(argv=None) -> None:
    import argparse

    from ..common import print0
    ap = argparse.ArgumentParser(prog="nanoseek export", description="write a distributed (DCP) training "
                                 "checkpoint, saved under any layout, as an HF-format model directory")
    ap.add_argument("checkpoint", help="OUT/checkpoints/step_NNNNNN, or a run directory (its newest checkpoint)")
    ap.add_argument("--out", required=True, help="model directory to write")
    ap.add_argument("--fp8", action="store_true", help="DeepSeek's FP8 checkpoint format (e4m3 + block scales)")
    args = ap.parse_args(argv)
    out = to_hf(args.checkpoint, args.out, args.fp8)
    print0(f"exported {args.checkpoint} -> {out}")
