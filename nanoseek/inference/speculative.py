"""MTP speculative decoding (V3 report sec. 5.4.3: 85-90% acceptance of the second token, 1.8x TPS).

The MTP module was trained to predict token i+2 from (main hidden state h_i, embedding of token i+1).
At decode time that makes it a free one-token draft:

    state of a row: main cache holds positions [0, L); token t_L ("pending") is sampled but not cached;
                    the MTP cache holds positions [0, M), and we keep h_i for i in [M, L).
    1. draft   MTP over positions [M, L) with inputs (h_i, emb t_{i+1})  -> d = argmax at position L-1
               (a guess for t_{L+1}); now M = L.
    2. verify  main model on [t_L, d] at positions L, L+1 (one forward, two tokens)
               g0 = argmax at L. g0 is exactly what plain greedy decoding would emit next.
               If g0 == d the draft was right, and the logits at L+1 give g1 = t_{L+2} for free:
               emit g0, g1 and advance L by 2; otherwise emit g0 and advance by 1 (the cache entry
               written for d sits past the valid length and is overwritten later).
Greedy only: with sampling, exactness needs the rejection-sampling correction, which we leave out
(sampled requests decode normally). Rows accept independently, so rows in one batch advance by 1 or
2; the cache's per-row start positions and right-padding handle the ragged shapes.
"""
from __future__ import annotations

import torch

from .sequence import Sequence


@torch.no_grad()
def speculative_step(eng) -> list[Sequence]:
    model, dev = eng.model, eng.device
    seqs = eng.running
    B = len(seqs)
    # 1. draft: MTP over each row's unprocessed positions [M, L) (right-padded to the longest)
    n_new = [s.hidden.shape[0] for s in seqs]
    T = max(n_new)
    D = model.cfg.hidden_size
    h_in = torch.zeros(B, T, D, dtype=seqs[0].hidden.dtype, device=dev)
    tok_in = torch.zeros(B, T, dtype=torch.long, device=dev)
    for b, s in enumerate(seqs):
        h_in[b, : n_new[b]] = s.hidden
        every = s.prompt_ids + s.out_ids                        # t_0 .. t_L (pending last)
        tok_in[b, : n_new[b]] = torch.tensor(every[s.mtp_len + 1: s.mtp_len + 1 + n_new[b]])
    eng.cache.begin(torch.tensor([s.mtp_len for s in seqs], device=dev), T)
    rot = model.rope(eng.cache.positions)
    with eng._autocast():
        h_mtp = model.mtp[0](h_in, model.embed(tok_in), rot, eng.cache)
        last = h_mtp[torch.arange(B, device=dev), torch.tensor(n_new, device=dev) - 1]
        drafts = model.mtp_logits(last, 1).float().argmax(dim=-1)
    for s in seqs:
        s.mtp_len = s.length
    # 2. verify [pending, draft] with the main model
    ids = torch.stack([torch.tensor([s.pending for s in seqs], device=dev), drafts], dim=1)
    h = eng._forward(ids, torch.tensor([s.length for s in seqs], device=dev))
    logits = eng._logits(h)                                                     # (B,2,V)
    logp = torch.log_softmax(logits, dim=-1)
    g = logits.argmax(dim=-1)                                                   # (B,2)
    accepted = (g[:, 0] == drafts).tolist()
    g, lp = g.tolist(), logp.gather(2, g.unsqueeze(2)).squeeze(2).tolist()
    eng.stats["spec_drafts"] += B
    for b, s in enumerate(seqs):
        s.length += 1
        eng._append(s, g[b][0], lp[b][0])
        if accepted[b] and not s.finish_reason:
            eng.stats["spec_accepted"] += 1
            s.length += 1
            eng._append(s, g[b][1], lp[b][1])
            s.hidden = h[b, :2]
        else:
            s.hidden = h[b, :1]
    return list(seqs)


def acceptance_rate(eng) -> float:
    return eng.stats["spec_accepted"] / max(1, eng.stats["spec_drafts"])
