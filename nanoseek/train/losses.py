"""The pretraining losses of one micro-batch, as shares of the whole optimizer step's.

    loss     = CE(next token)                       summed over scored targets / LossNorm.tokens
    mtp_loss = mean_k CE(depth-k target)            each depth over LossNorm.mtp[k]
    balance  = alpha * sum over MoE layers of the sequence-wise (or batch-level) balance loss,
               weighted by this micro-batch's share of LossNorm.seqs
    total    = loss + mtp_lambda * mtp_loss + balance

Counting the denominators over the step's whole global batch before any forward (`loss_norm`) is
what makes gradient accumulation, data/expert parallelism and pipelining sum to one process's loss on
the whole batch. `cfg` is the trainer's `PretrainConfig` (doc_mask, mtp_lambda, balance and its alphas).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import Transformer
from ..model.moe import RoutingRecord, balance_loss
from .flex_mask import training_mask
from .logprobs import cross_entropy_sum


def mtp_targets(batch: torch.Tensor, k: int, mask: torch.Tensor | None = None,
                doc: torch.Tensor | None = None) -> torch.Tensor:
    """Depth-k target at position i is token i+k+1 of the window. Ignored (-100): the last k positions,
    masked tokens, and targets in another document than position i."""
    y = batch[:, k + 1:]
    if mask is not None:
        y = y.masked_fill(mask[:, k + 1:] == 0, -100)
    if doc is not None:
        y = y.masked_fill(doc[:, k + 1:] != doc[:, : -(k + 1)], -100)
    return torch.cat([y, y.new_full((y.shape[0], k), -100)], dim=1)


@dataclass
class LossNorm:
    """Denominators of one optimizer step's mean losses, counted over its whole global batch (every
    micro-batch, every data-parallel rank): a micro-batch's loss is its sum over tokens divided by
    these, so the shares of all micro-batches and ranks add up to the loss of one process on the
    whole batch, and so do their gradients (what makes --grad-accum, --dp-shard, --ep and --pp equal
    one big batch)."""
    tokens: int                 # scored next-token targets
    mtp: list[int]              # scored targets per MTP depth
    seqs: int                   # sequences (the sequence-wise balance loss is a mean over them)


def doc_ids(batch: torch.Tensor, bos: int) -> torch.Tensor:
    return (batch == bos).cumsum(dim=1)


def loss_norm(batches: list[tuple[torch.Tensor, torch.Tensor | None]], cfg, bos: int,
              mtp_depths: int) -> LossNorm:
    """Count the targets of a step's (batch, mask) pairs (each (B,T+1)), before any forward."""
    tokens, mtp, seqs = 0, [0] * mtp_depths, 0
    for batch, mask in batches:
        seqs += batch.shape[0]
        tokens += int((mask[:, 1:] != 0).sum()) if mask is not None else batch[:, 1:].numel()
        doc = doc_ids(batch, bos) if cfg.doc_mask else None
        for k in range(1, mtp_depths + 1):
            mtp[k - 1] += int((mtp_targets(batch, k, mask, doc) != -100).sum())
    return LossNorm(tokens, mtp, seqs)


def head_losses(model: Transformer, h: torch.Tensor, batch: torch.Tensor, cfg, norm: LossNorm,
                mask: torch.Tensor | None = None, routing=None, doc_attention=None) -> dict[str, torch.Tensor]:
    """Next-token and MTP losses (this micro-batch's shares, see LossNorm) from the main model's last
    hidden state h (B,T,D) of the window batch (B,T+1); the MTP block's MoE adds to `routing`.
    `doc_attention`: the (positions, mask) the main model ran with, reused by MTP (default: made here)."""
    x = batch[:, :-1]
    y = batch[:, 1:] if mask is None else batch[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    positions = attn = doc = None
    if cfg.doc_mask:
        positions, attn = doc_attention or training_mask(x, model.cfg.bos_token_id)
        doc = doc_ids(batch, model.cfg.bos_token_id)
    V = model.cfg.vocab_size

    def ce(logits, target, count):
        return cross_entropy_sum(logits.view(-1, V), target.reshape(-1)) / max(count, 1)
    losses = {"loss": ce(model.logits(h), y, norm.tokens)}
    if cfg.mtp_lambda > 0 and len(model.mtp):
        mtp = [ce(model.mtp_logits(hk, k), mtp_targets(batch, k, mask, doc), norm.mtp[k - 1])
               for k, hk in enumerate(model.mtp_hidden(h, x, positions, mask=attn, routing=routing), start=1)]
        losses["mtp_loss"] = torch.stack(mtp).mean()
    return losses


def balance_share(routing: RoutingRecord, n_seq: int, cfg, norm: LossNorm) -> torch.Tensor | None:
    """The balance loss of the MoE layers whose (scores, expert ids) a forward added to `routing`
    (this micro-batch's share of the step's). Sequence-wise (--balance bias) it is an exact share of
    the global batch's; the classic batch-level loss (--balance aux) is computed per micro-batch and
    rank, as Megatron does, weighted by its share of the sequences."""
    alpha, per_seq = ((cfg.seq_aux_alpha, True) if cfg.balance == "bias" else
                      (cfg.aux_alpha, False) if cfg.balance == "aux" else (0.0, True))
    if alpha <= 0 or not routing:                      # (MTP's MoE is idle without MTP loss)
        return None
    terms = [balance_loss(scores, idx, n_seq, per_seq) for scores, idx in routing]
    return alpha * torch.stack(terms).sum() * (n_seq / norm.seqs)


def forward_losses(model: Transformer, batch: torch.Tensor, cfg,
                   mask: torch.Tensor | None = None, norm: LossNorm | None = None) -> dict[str, torch.Tensor]:
    """batch (B,T+1) ids; mask (B,T+1) optional per-token loss mask (of the same tokens). `norm`: the
    step's global counts (default: this batch alone, i.e. plain means)."""
    if norm is None:
        norm = loss_norm([(batch, mask)], cfg, model.cfg.bos_token_id, len(model.mtp))
    x = batch[:, :-1]
    positions = attn = None
    if cfg.doc_mask:
        positions, attn = training_mask(x, model.cfg.bos_token_id)
    routing = RoutingRecord()
    losses = head_losses(model, model.hidden(x, positions, mask=attn, routing=routing), batch, cfg, norm, mask,
                         routing, (positions, attn))
    bal = balance_share(routing, x.shape[0], cfg, norm)
    if bal is not None:
        losses["balance_loss"] = bal
    losses["total"] = losses["loss"] + cfg.mtp_lambda * losses.get("mtp_loss", 0.0) + losses.get("balance_loss", 0.0)
    return losses
