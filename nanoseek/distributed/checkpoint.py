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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .mesh import Dist

COMPLETE = "COMPLETE"


def _wrap_experts(sd: dict, names: list[str], d: Dist) -> dict:
    """Expert slices -> DTensors over (edp, ep): Replicate, Shard(0). Same storage, so loading into
    the wrapper fills the slice."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not names:
        return sd
    mesh = d.emesh["edp", "ep"]
    ep = d.layout.ep

    def wrap(t):
        shape = (t.shape[0] * ep, *t.shape[1:])
        return DTensor.from_local(t, mesh, [Replicate(), Shard(0)], run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    out = dict(sd)
    for n in names:
        if n in out:
            v = out[n]
            out[n] = {k: wrap(x) if torch.is_tensor(x) and x.dim() > 0 else x for k, x in v.items()} \
                if isinstance(v, dict) else wrap(v)
    return out


def _unwrap(sd: dict, names: list[str]) -> dict:
    out = dict(sd)
    for n in names:
        if n in out:
            v = out[n]
            out[n] = {k: x.to_local() if hasattr(x, "to_local") else x for k, x in v.items()} \
                if isinstance(v, dict) else v.to_local()
    return out


def _states(model: nn.Module, opt, par):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    names = par.expert_names if par is not None else []
    msd = _wrap_experts(msd, names, par.d) if names else msd
    if names:
        osd = dict(osd)
        osd["state"] = _wrap_experts(osd["state"], names, par.d)
    return msd, osd, names


def save(path: Path, model: nn.Module, opt, par, train_state: dict, keep: int = 2) -> Path:
    """Write a DCP checkpoint of this step (collective: every rank calls it)."""
    path = Path(path)
    msd, osd, _ = _states(model, opt, par)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        torch.save(train_state, path / "train_state.pt")
        (path / COMPLETE).write_text("")
        done = sorted(p for p in path.parent.glob("step_*") if (p / COMPLETE).exists())
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def latest(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in Path(ckpt_dir).glob("step_*") if p.is_dir() and (p / COMPLETE).exists())
    return done[-1] if done else None


def load(path: Path, model: nn.Module, opt, par) -> dict:
    """Load a DCP checkpoint saved under any layout into this layout's model and optimizer (in place);
    returns the train state (step, data position, RNG, config)."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    msd, osd, names = _states(model, opt, par)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(path))
    if names:
        msd = _unwrap(msd, names)
        osd = dict(osd)
        osd["state"] = _unwrap(osd["state"], names)
    built = [g.get("foreach") for g in opt.param_groups]
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    for g, foreach in zip(opt.param_groups, built):    # an implementation choice of this layout, not state
        g["foreach"] = foreach
    return torch.load(Path(path) / "train_state.pt", weights_only=False)


@torch.no_grad()
def export_full_state_dict(model: nn.Module, par) -> dict | None:
    """The full model's state dict on rank 0 (None elsewhere); collective."""
    d = par.d
    sd = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        elif k in par.expert_names and d.layout.ep > 1:
            parts = [torch.empty_like(v) for _ in range(d.layout.ep)]
            dist.all_gather(parts, v.contiguous(), group=d.group("ep"))
            v = torch.cat(parts)
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
