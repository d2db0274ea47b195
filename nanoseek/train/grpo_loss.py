"""GRPO's pure pieces: group advantages, the clipped token loss with its aggregation modes, k3 KL, and
log-probs of given tokens. Small functions, pinned by tests on hand-computed numbers.

DeepSeekMath eq. 3 / R1: for G outputs o_i of one prompt with rewards r_i,
    A_i      = (r_i - mean(r)) / (std(r) + eps)            "group" scaling (std off: Dr. GRPO)
    rho_it   = pi(o_it) / pi_old(o_it)
    l_it     = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta * KL_it
    KL_it    = pi_ref/pi - log(pi_ref/pi) - 1               (Schulman's k3, >= 0)
Aggregation of -l over tokens (the Dr. GRPO / DAPO debate, spec sec. 2.2):
    grpo     mean over sequences of the per-sequence token mean     (length-biased)
    dr_grpo  sum over all tokens / (N sequences * max_completion_len)
    dapo     sum over all tokens / total tokens                      (token-level; TRL's default)
With one update per rollout (mu = 1) rho == 1 and the loss is REINFORCE with a group baseline.
"""
from __future__ import annotations

import torch

from .logprobs import token_logprob

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
LEVELS = ("token", "sequence")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """rewards (N,) laid out group after group -> advantages (N,). Zero-variance groups get 0. A NaN
    reward (a sample the reward failed on) is left out of its group's mean and std and gets advantage 0."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards={scale!r}: choose one of {SCALES}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards is not a multiple of group_size={group_size}")
    r = rewards.float().view(-1, group_size)
    valid = ~torch.isnan(r)
    n = valid.sum(dim=1, keepdim=True)
    mean = torch.where(valid, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
    adv = torch.where(valid, r - mean, 0.0)
    if scale == "group":                                          # unbiased std, as TRL
        adv = adv / ((adv.pow(2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt() + eps)
    elif scale == "batch":
        adv = adv / (rewards.float()[~torch.isnan(rewards.float())].std() + eps)
    return torch.nan_to_num(adv.view(-1))


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = (ref_logp - logp).clamp(-20, 20)
    return d.exp() - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              eps_low: float = 0.2, eps_high: float = 0.2, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
              loss_type: str = "dapo", max_len: int | None = None, n_tokens: float | None = None,
              n_seqs: int | None = None, level: str = "token", is_weight: torch.Tensor | None = None):
    """logp/old_logp/ref_logp/mask (N,T), adv (N,) -> (loss, stats dict of floats).

    `n_tokens` / `n_seqs` let a minibatch be normalised by the whole rollout batch (DAPO's "global
    accumulated batch"); by default they are this batch's own counts.
    `level="sequence"` is GSPO (Zheng et al. 2025): one ratio per sequence, the geometric mean of its
    token ratios, exp(mean_t(logp - old_logp)), clipped as a whole (GSPO uses eps ~3e-4 / 4e-4);
    the gradient reaches each token as ratio_i / |o_i|.
    `is_weight` (N,T), detached: a per-token importance weight on the policy-gradient term (rollout
    correction: the trainer's old policy over the sampler's, truncated or masked by the caller).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: choose one of {LOSS_TYPES}")
    if level not in LEVELS:
        raise ValueError(f"importance level {level!r}: choose one of {LEVELS}")
    mask = mask.float()
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)).expand_as(logp)
    ratio = log_ratio.clamp(-20, 20).exp()
    a = adv.unsqueeze(1)
    unclipped, clipped = ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a
    per_token = torch.minimum(unclipped, clipped)
    if is_weight is not None:
        per_token = per_token * is_weight
    kl = None
    if beta and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token - beta * kl
    per_token = -per_token * mask
    N = n_seqs if n_seqs is not None else logp.shape[0]
    if loss_type == "grpo":
        loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / N
    elif loss_type == "dr_grpo":
        L = max_len if max_len is not None else logp.shape[1]
        loss = per_token.sum() / (N * L)
    else:
        loss = per_token.sum() / (n_tokens if n_tokens is not None else mask.sum().clamp(min=1))
    with torch.no_grad():
        denom = mask.sum().clamp(min=1)
        low = ((ratio < 1 - eps_low) & (a < 0)).float()
        high = ((ratio > 1 + eps_high) & (a > 0)).float()
        stats = {"clip_frac": float(((low + high) * mask).sum() / denom),
                 "clip_low": float((low * mask).sum() / denom), "clip_high": float((high * mask).sum() / denom),
                 "ratio_mean": float((ratio * mask).sum() / denom)}
        if mask.any():
            stats["ratio_min"] = float(ratio[mask.bool()].min())
            stats["ratio_max"] = float(ratio[mask.bool()].max())
        if kl is not None:
            stats["kl"] = float((kl * mask).sum() / denom)
    return loss, stats


def token_logprobs(logits_fn, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   chunk: int = 4096, with_entropy: bool = False):
    """log softmax(logits / T) at `targets`, computed in chunks of rows so the full (tokens x vocab) logits
    never sit in memory at once (the first memory wall GRPO users hit).

    hidden (M,D) -> logits_fn -> (M,V); targets (M,). Returns logp (M,) [and entropy (M,)].
    """
    out, ent = [], []
    t = temperature if temperature > 0 else 1.0
    for i in range(0, hidden.shape[0], chunk):
        logits = logits_fn(hidden[i: i + chunk])
        out.append(token_logprob(logits, targets[i: i + chunk], 1.0 / t))       # one softmax, fwd + bwd
        if with_entropy:
            with torch.no_grad():
                z = logits.float() / t
                ent.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    logp = torch.cat(out) if out else hidden.new_zeros(0)
    return (logp, torch.cat(ent) if ent else hidden.new_zeros(0)) if with_entropy else logp
