"""Apply the parallel layout to a single-device model, in one place and one fixed order:

    1. pipeline split   keep only this rank's layers (and the embedding / head / MTP where its
                        stages need them): `pipeline.prune`
    2. FP8 conversion   (the trainer, before this file: FP8 modules are what gets sharded)
    3. expert parallel  each MoE keeps this rank's experts; all-to-all dispatch/combine around them
    4. FSDP2            `fully_shard` each router (fp32), each transformer block, then the root, over
                        (dp_replicate, dp_shard): ZeRO-3 sharding of dense parameters, gradients and
                        AdamW state (`--zero 2` keeps parameters gathered between forward and backward)

as torchtitan's `parallelize.py` does. `Parallel` then carries what the training loop does
differently on more than one process: the rows of the global batch this rank trains on, gradient
sync of the parameters FSDP does not own (experts, and dense weights under pipelining), the global
gradient norm, and the all-reduced metrics and expert loads.

Gradient convention: every rank's loss is its share of the global step's loss (sums over its tokens
divided by the global counts, `train/pretrain.py`'s `LossNorm`), so the sum over ranks is the loss
one process computes on the whole batch. FSDP averages gradients over dp, so each rank backpropagates
its share times dp; gradients FSDP does not reduce are summed over their replicas and divided by dp.
(FSDP's `set_gradient_divide_factor(1)` would say "sum" directly, but needs NCCL's PreMulSum, which
gloo lacks; multiplying by dp and averaging again is exact when dp is a power of two.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE
from .expert_parallel import apply_expert_parallel, expert_modules
from .mesh import Dist, all_reduce


def _fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    return [b for b in model.blocks() if not isinstance(b, nn.Identity)]


def apply_fsdp(model: nn.Module, d: Dist, param_dtype: torch.dtype | None, zero2: bool = False) -> None:
    """FSDP2 per block, then the root (embedding, head, final norm, MTP projections). Routed experts
    under EP are left to `Parallel.sync_grads` (`ignored_params`): they are sharded over ep already."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = d.mesh["dp_replicate", "dp_shard"]
    experts = {p for m in expert_modules(model).values() for p in m.parameters()}
    mp = MixedPrecisionPolicy(param_dtype=param_dtype if param_dtype != torch.float32 else None,
                              reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in _fsdp_blocks(model):
        if isinstance(block.ffn, MoE):     # the router keeps fp32 weights, as in one process (logits in fp32)
            fully_shard(block.ffn.gate, mesh=mesh, mp_policy=fp32, reshard_after_forward=not zero2)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not zero2,
                    ignored_params={p for p in block.parameters() if p in experts})
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, ignored_params=experts)
    for name in ("hidden", "logits", "mtp_hidden", "mtp_logits"):     # the trainer calls these, not forward
        register_fsdp_forward_method(model, name)


class Parallel:
    """What one training step does differently on several processes (see the module docstring)."""

    def __init__(self, d: Dist, model: nn.Module, param_dtype: torch.dtype | None = None,
                 zero2: bool = False, placements: dict | None = None):
        self.d, self.lay = d, d.layout
        self.model = model
        self.expert_names: list[str] = []
        if self.lay.ep > 1:
            self.expert_names = apply_expert_parallel(model, d.group("ep"), self.lay.ep, d.ep_rank, placements)
        self.fsdp = self.lay.dp > 1 and self.lay.pp == 1
        if self.fsdp:
            apply_fsdp(model, d, param_dtype, zero2)
        self.experts = [p for m in expert_modules(model).values() for p in m.parameters()]
        self._expert_ids = {id(p) for p in self.experts}
        self.dense = [p for p in model.parameters() if id(p) not in self._expert_ids]

    # --------------------------------------------------------------------------------------------
    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This dp rank's rows of a global (B, ...) batch."""
        n = t.shape[0] // self.lay.dp
        return t[self.d.dp_rank * n:(self.d.dp_rank + 1) * n]

    @property
    def loss_scale(self) -> float:
        """Backpropagate loss * this: FSDP's gradient reduction averages over dp."""
        return float(self.lay.dp)

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Sum the gradients FSDP does not reduce over the ranks that hold the same weights, / dp."""
        dp = self.lay.dp
        groups = [(self.experts, self.d.group("edp"))]
        if not self.fsdp:
            groups.append((self.dense, self.d.group("dp")))
        for params, group in groups:
            for p in params:          # a parameter no token reached here still joins the all-reduce
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            if not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            all_reduce(flat, group)
            if dp > 1:
                flat /= dp
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global gradient norm over every rank's shards (each counted once), clipped as torch does."""
        lay = self.lay
        sq = torch.zeros((), dtype=torch.float64, device=self.d.device)
        for p in self.dense + self.experts:
            if p.grad is None:
                continue
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            copies = lay.edp if id(p) in self._expert_ids else lay.dp_replicate if self.fsdp else lay.dp
            sq += g.double().pow(2).sum() / copies
        all_reduce(sq, self.d.group("world"))
        norm = float(sq.sqrt())
        if max_norm > 0:
            coef = min(1.0, max_norm / (norm + 1e-6))
            if coef < 1.0:
                for p in self.dense + self.experts:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        return norm

    @torch.no_grad()
    def reduce_logs(self, logs: dict[str, float], keys=("loss", "mtp_loss", "balance_loss")) -> dict[str, float]:
        """Sum each rank's share of the step's losses over the world (each share counted once). Ranks may
        hold different subsets of `keys` (a pipeline stage without the head has no "loss")."""
        t = torch.tensor([[logs.get(k, 0.0) for k in keys], [float(k in logs) for k in keys]], dtype=torch.float64,
                         device=self.d.device)
        all_reduce(t, self.d.group("world"))
        return {k: v for k, v, has in zip(keys, t[0].tolist(), t[1].tolist()) if has}

    @torch.no_grad()
    def reduce_expert_load(self, moes) -> None:
        """Expert loads summed over data parallelism, so every rank's bias update sees the global batch."""
        group = self.d.group("dp")
        if group is not None and moes:
            loads = torch.stack([m.expert_load for m in moes])
            dist.all_reduce(loads, group=group)
            for m, l in zip(moes, loads):
                m.expert_load.copy_(l)

    def describe(self) -> str:
        return self.lay.describe()
