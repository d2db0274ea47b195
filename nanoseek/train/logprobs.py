"""Log-probabilities of target tokens, forward and backward in one softmax.

`token_logprob(logits, targets)` = log_softmax(logits * scale)[target] for each row, the quantity both
the pretraining cross-entropy (its negative) and GRPO's policy ratio are made of. Autograd through
`F.cross_entropy(logits.float())` or `gather - logsumexp` makes ~9 passes over the (tokens x vocab)
logits: a cast to fp32, log-softmax (or logsumexp) forward, a zero-filled gradient with its scatter, the
log-softmax backward (a second exp), a cast back. Here the forward runs one softmax kernel (it reads
bf16 logits and writes fp32 probabilities), reads the target's probability, and keeps
d logp / d logits = scale * (onehot - p) in the logits' dtype; the backward scales it by the incoming
gradient. Exact maths, tested against both references in fp32 and bf16. Under bf16 autocast the kept
gradient and its product with the incoming one are each rounded to bf16, where the cast's backward
rounded once (a relative error of ~2^-8 at most, what the bf16 GEMM behind the logits sees anyway).

On CPU log p is taken from the probability, which is exact to fp32 rounding while p is a normal float;
rows whose target probability falls below 1e-30 (a log-probability under -69) are recomputed as
logit - logsumexp. On a GPU that check would make the host wait, so every row takes logit - logsumexp
(one more pass over the logits, no sync).
"""
from __future__ import annotations

import torch

TINY = 1e-30


class _TokenLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, scale: float, ignore_index: int, sync_free: bool):
        z = logits if scale == 1.0 else logits.float() * scale
        p = torch.softmax(z, dim=-1, dtype=torch.float32)                           # (M,V) fp32
        valid = targets != ignore_index
        tgt = targets.masked_fill(~valid, 0).unsqueeze(1)
        if sync_free:        # a GPU: no host sync; logsumexp for every row (one more pass, cheap there)
            logp = z.gather(1, tgt).squeeze(1).float() - torch.logsumexp(z.float(), dim=-1)
        else:                # CPU: the probability's log, and the exact form only where it underflows
            p_y = p.gather(1, tgt).squeeze(1)
            logp = p_y.log()
            tiny = valid & (p_y < TINY)
            if bool(tiny.any()):
                rows = tiny.nonzero().squeeze(1)
                zr = z[rows].float()
                logp[rows] = zr.gather(1, tgt[rows]).squeeze(1) - torch.logsumexp(zr, dim=-1)
        logp = logp.masked_fill(~valid, 0.0)
        ctx.scale = scale
        if ctx.needs_input_grad[0]:
            # d logp_y / d z = onehot(y) - p; kept negated (p - onehot), zero on ignored rows
            p.scatter_add_(1, tgt, valid.to(p.dtype).unsqueeze(1).neg())
            if sync_free:
                p.masked_fill_(~valid.unsqueeze(1), 0.0)
            elif not bool(valid.all()):
                p[~valid] = 0.0
            ctx.save_for_backward(p.to(logits.dtype))
        return logp

    @staticmethod
    def backward(ctx, g):
        (p_minus_onehot,) = ctx.saved_tensors
        coef = (g * -ctx.scale).to(p_minus_onehot.dtype).unsqueeze(1)
        return p_minus_onehot * coef, None, None, None, None


def token_logprob(logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                  ignore_index: int = -100, sync_free: bool | None = None) -> torch.Tensor:
    """logits (M,V) any float dtype, targets (M,) -> fp32 (M,) log_softmax(logits * scale)[target];
    0 (and no gradient) where target == ignore_index. `sync_free` (default: off CPU) takes log p from
    logit - logsumexp for every row instead of branching on the data, which would wait for the GPU."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logprob wants logits (M,V) and targets (M,), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if sync_free is None:
        sync_free = logits.device.type != "cpu"
    return _TokenLogprob.apply(logits, targets, float(scale), ignore_index, bool(sync_free))


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """F.cross_entropy(logits.float(), targets, ignore_index, reduction="sum"), in one softmax."""
    return -token_logprob(logits, targets, 1.0, ignore_index).sum()
