"""Pipeline parallelism with torch.distributed.pipelining: the layers cut into stages, micro-batches
scheduled by 1F1B, interleaved 1F1B, zero-bubble V (ZBV) or DualPipeV (V3 sec. 3.2.2, the V-shaped
"cut-in-half" DualPipe).

    stages   S = pp (1f1b) or 2 * pp (interleaved, zbv, dualpipev); layers split evenly over them
    rank r   holds stage r (1f1b); r and r + pp (interleaved, a loop); r and 2*pp-1-r (zbv and
             dualpipev, a V: rank 0 holds the first and the last stage)

The V placement is what lets MTP train under pipelining as in V3: the embedding (first stage) and the
output head (last stage) live on one rank, and MTP needs both - its module embeds the shifted tokens
and shares the head. With a loop placement they sit on different ranks, so `mesh.check_layout`
refuses MTP there.

Each rank keeps a pruned copy of the model (`prune`: the layers of its stages, the embedding if it
holds stage 0, final norm + head + MTP if it holds the last), so its state dict has the full model's
names for the parts it owns: checkpoints and the HF export need no renaming. A `Stage` runs its
layers; the window's token ids travel with the hidden state (they give each stage the document mask
and positions, and the last stage its targets). The last stage's loss function computes the next-token
and MTP losses; the balance loss of an MoE layer in any stage is added where that layer runs
(`_WithAux`: identity forward, and in backward it also feeds the loss's gradient into the balance term,
Megatron's trick) because the pipeline has one loss per micro-batch and it lives on the last stage.

Losses follow the trainer's convention (`LossNorm`): each micro-batch returns its share of the step's
loss, so the schedule must not rescale gradients (`scale_grads=False`).

torch's ScheduleDualPipeV runs DualPipe's schedule (F&B pairs, zero-bubble W split) but without the
overlap of one micro-batch's all-to-all under another's compute: that needs an `OVERLAP_F_B` action
that interleaves attention/dispatch/MLP/combine by hand on async collectives, which is not written.
"""
from __future__ import annotations

import torch
from torch import nn

from ..data.loader import document_mask
from ..model.moe import RoutingRecord
from .mesh import Dist, Layout, V_SHAPED


def stages_of_rank(lay: Layout, pp_rank: int) -> list[int]:
    if lay.pp_schedule == "1f1b":
        return [pp_rank]
    if lay.pp_schedule == "interleaved":
        return [pp_rank, pp_rank + lay.pp]
    return [pp_rank, 2 * lay.pp - 1 - pp_rank]


def layers_of_stage(stage: int, n_stages: int, n_layers: int) -> list[int]:
    per = n_layers // n_stages
    return list(range(stage * per, (stage + 1) * per))


def prune(model: nn.Module, lay: Layout, pp_rank: int) -> None:
    """Drop, in place, what this rank's stages do not run (see the module docstring)."""
    mine = stages_of_rank(lay, pp_rank)
    keep = {i for s in mine for i in layers_of_stage(s, lay.n_stages, len(model.layers))}
    for i in range(len(model.layers)):
        if i not in keep:
            model.layers[i] = nn.Identity()
    if 0 not in mine:
        model.embed = None
    if lay.n_stages - 1 not in mine:
        model.norm = model.head = None
        model.mtp = nn.ModuleList()


class _WithAux(torch.autograd.Function):
    """h unchanged; in backward the auxiliary loss gets gradient `scale` as if it were added to the loss."""

    @staticmethod
    def forward(ctx, h, aux, scale: float):
        ctx.scale = scale
        ctx.aux_shape = aux.shape
        return h.clone()       # not `h`: that would be a view, and the pipeline detaches stage outputs in place

    @staticmethod
    def backward(ctx, grad_h):
        return grad_h, torch.full(ctx.aux_shape, ctx.scale, device=grad_h.device), None


class Stage(nn.Module):
    """Layers [layer_ids] of the model; stage 0 also embeds. forward(batch | h, batch) -> (h, batch)."""

    def __init__(self, model: nn.Module, index: int, layer_ids: list[int], step: "PipelineStep"):
        super().__init__()
        self.index = index
        self.embed = model.embed if index == 0 else None
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        if index == step.lay.n_stages - 1:
            # what the loss function runs belongs to the last stage: the zero-bubble schedules compute
            # weight gradients (their W step) only for a stage's own parameters. The MTP module shares
            # the embedding, so the embedding belongs to the first and the last stage (same rank, V shape)
            # and each stage's W step adds its part of the embedding's gradient.
            self.norm, self.head, self.mtp = model.norm, model.head, model.mtp
            self.mtp_embed = model.embed if len(model.mtp) else None
        self._rope, self._bos, self._step = model.rope, model.cfg.bos_token_id, step

    def forward(self, *args):
        if self.index == 0:
            (batch,) = args
            h = self.embed(batch[:, :-1])
        else:
            h, batch = args
        x = batch[:, :-1]
        if self._step.cfg.doc_mask:
            positions, attn = document_mask(x, self._bos)
        else:
            positions, attn = torch.arange(x.shape[1], device=x.device).unsqueeze(0), None
        rot = self._rope(positions)
        for layer in self.layers.values():
            routing = RoutingRecord()
            h = layer(h, rot, None, attn, routing)
            h = self._step.add_balance(h, routing, x.shape[0])
        return h, batch.clone()


class PipelineStep:
    """One optimizer step's forward and backward through the pipeline schedule."""

    def __init__(self, model: nn.Module, d: Dist, cfg, loss_scale: float, head_losses, balance_share,
                 shapes: tuple[int, int, int]):
        """`head_losses(model, h, batch, cfg, norm, mask, routing)` and `balance_share(routing, n_seq, cfg, norm)`:
        the trainer's loss functions (nanoseek/train/pretrain.py), so both paths compute one loss.
        `shapes`: (micro-batch rows, sequence length, hidden size)."""
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleDualPipeV,
                                                  ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)

        self._head_losses, self._balance_share = head_losses, balance_share
        lay = d.layout
        self.model, self.cfg, self.lay, self.scale = model, cfg, lay, loss_scale
        self.norm = None
        self.logs: dict[str, float] = {}
        self.mine = stages_of_rank(lay, d.pp_rank)
        # explicit stage input/output shapes: torch's runtime shape inference runs each stage once on
        # uninitialised buffers, which would feed garbage token ids to the loss
        B, T, D = shapes
        ids = torch.zeros(B, T + 1, dtype=torch.long, device=d.device)
        g = torch.zeros(B, T, D, device=d.device)
        h = g.clone().requires_grad_()          # activations carry gradients, token ids do not
        self.stages = [PipelineStage(Stage(model, s, layers_of_stage(s, lay.n_stages, len(model.layers)), self),
                                     s, lay.n_stages, d.device, group=d.group("pp"),
                                     input_args=(ids,) if s == 0 else (h, ids), output_args=(h, ids),
                                     output_grads=(g, None), input_grads=(None,) if s == 0 else (g, None))
                       for s in self.mine]
        kind = {"1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
                "dualpipev": ScheduleDualPipeV}[lay.pp_schedule]
        stages = self.stages[0] if lay.pp_schedule == "1f1b" else self.stages
        self.schedule = kind(stages, n_microbatches=lay.microbatches, loss_fn=self._loss, scale_grads=False)
        self.first, self.last = 0 in self.mine, lay.n_stages - 1 in self.mine
        assert not (lay.pp_schedule in V_SHAPED) or (self.first == self.last)

    def _log(self, key: str, value: torch.Tensor) -> None:
        self.logs[key] = self.logs.get(key, 0.0) + float(value.detach())

    def add_balance(self, h: torch.Tensor, routing: RoutingRecord, n_seq: int) -> torch.Tensor:
        share = self._balance_share(routing, n_seq, self.cfg, self.norm)
        if share is None or not torch.is_grad_enabled():
            return h
        self._log("balance_loss", share)
        return _WithAux.apply(h, share, self.scale)

    def _loss(self, output, target):
        h, batch = output
        mask = target if self._has_mask else None
        routing = RoutingRecord()
        losses = self._head_losses(self.model, h, batch, self.cfg, self.norm, mask, routing)
        bal = self._balance_share(routing, batch.shape[0], self.cfg, self.norm)
        if bal is not None:
            losses["balance_loss"] = bal
        for k, v in losses.items():
            self._log(k, v)
        total = losses["loss"] + self.cfg.mtp_lambda * losses.get("mtp_loss", 0.0) + losses.get("balance_loss", 0.0)
        return total * self.scale

    def run(self, batch: torch.Tensor, mask: torch.Tensor | None, norm) -> dict[str, float]:
        """Forward + backward of this rank's (B,T+1) rows as micro-batches; returns this rank's loss shares
        (the trainer all-reduces them). Gradients accumulate into the parameters."""
        self.norm, self.logs, self._has_mask = norm, {}, mask is not None
        target = mask if mask is not None else batch
        if self.first:
            self.schedule.step(batch, target=target if self.last else None)
        elif self.last:
            self.schedule.step(target=target)
        else:
            self.schedule.step()
        return self.logs
