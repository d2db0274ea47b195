"""Activation checkpointing, applied from outside the model (`pretrain --recompute`).

Each transformer block (main and MTP) keeps only its inputs for backward and runs its forward again
when backward reaches it (torch.utils.checkpoint, non-reentrant): memory for activations drops from
every intermediate of every block to one (B, T, D) input per block, for about one more forward's time.
The model code is untouched: the wrapper replaces each block's `forward` on the instance, so
`block.compile()`, FP8 conversion and FSDP sit on top of it as they do on a plain block.

The recomputed forward repeats the MoE layers' side effects: `expert_load` counts every token twice
(the bias update's sign rule and the load ratios are unchanged) and a `RoutingRecord` gets the
recomputed layers appended after the loss that read it was built. Routing replay reads the record
while recomputing, so it is refused with checkpointing. The wrapper is bound to its block, so a
deepcopy of the model recomputes with the copy's weights.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch.utils.checkpoint import checkpoint


def checkpoint_blocks(model) -> int:
    """Wrap every block's forward in a non-reentrant checkpoint; returns how many blocks."""
    n = 0
    for block in model.blocks():
        if getattr(block, "_recompute", False):
            continue
        # bound to the block (MethodType), so that a deepcopy of the model rebinds it to the copy
        block.forward = types.MethodType(_checkpointed_forward, block)
        block._recompute = True
        n += 1
    return n


def _checkpointed_forward(block, *args, **kwargs):
    plain = type(block).forward
    if not torch.is_grad_enabled():
        return plain(block, *args, **kwargs)
    routing = inspect.signature(plain).bind(block, *args, **kwargs).arguments.get("routing")
    if routing is not None and getattr(routing, "replay", None) is not None:
        raise ValueError("activation checkpointing cannot recompute a forward with routing replay: the "
                         "recomputed layers would read the wrong layer's replayed experts")
    return checkpoint(plain, block, *args, use_reentrant=False, **kwargs)


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs, parameters excluded: what
    activation checkpointing trades for recomputation."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total
