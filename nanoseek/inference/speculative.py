"""MTP speculative decoding (V3 report sec. 5.4.3: 85-90% acceptance of the second token, 1.8x TPS).

The MTP module was trained to predict token i+2 from (main hidden state h_i, embedding of token i+1).
At decode time that makes it a free one-token draft:

    state of a row: main cache holds positions [0, L); token t_L ("pending") is sampled but not cached;
                    `draft` is the MTP module's guess for t_{L+1}; the MTP cache holds [0, L).
    one step (the runner's `speculate`, one compiled graph):
      verify  main model on [t_L, draft] at positions L, L+1 -> greedy g0, g1. g0 is exactly what plain
              greedy decoding would emit next; if g0 == draft the draft was right and g1 = t_{L+2} comes
              for free: emit g0, g1 and advance L by 2, else emit g0 and advance by 1 (the cache entry
              written for the draft sits past the valid length and is overwritten later).
      draft   MTP module on the same two positions with inputs (h_L, emb g0), (h_{L+1}, emb g1): the
              output at the last accepted position is the next draft (the other position's MTP cache
              entry is past the valid length, like the main one).
    catch-up: after the prefill (or plain decode steps in a mixed batch) a row's MTP cache lags behind;
              `catch_up` runs the MTP module eagerly over the positions it has not seen, from the main
              hidden states the engine kept, and yields the row's first draft.
Greedy only: with sampling, exactness needs the rejection-sampling correction, which we leave out
(sampled requests decode normally). Only for small batches (SPEC_MAX_ROWS running rows): the verify
step computes two rows per sequence, which at larger batches costs more than the accepted drafts save
(measured on the main job's 1M model with both steps compiled: 1.14x plain at batch 1, 1.0x at 2,
0.95x at 4, 0.78x at 16); larger batches decode plainly and keep the hidden states for the draft.
Rows accept independently, so rows in one batch advance by 1 or 2; the cache's per-row start
positions and right-padding handle the ragged shapes.
"""
from __future__ import annotations

import torch

from .sequence import Sequence

SPEC_MAX_ROWS = 2


@torch.no_grad()
def catch_up(eng, seqs: list[Sequence]) -> None:
    """MTP over each row's unprocessed positions [M, L) (right-padded to the longest) -> its draft."""
    model, dev = eng.model, eng.device
    B = len(seqs)
    n_new = [s.hidden.shape[0] for s in seqs]
    T = max(n_new)
    h_in = torch.zeros(B, T, model.cfg.hidden_size, dtype=seqs[0].hidden.dtype, device=dev)
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
        drafts = model.mtp_logits(last, 1).float().argmax(dim=-1).tolist()
    for s, d in zip(seqs, drafts):
        s.mtp_len, s.hidden, s.draft = s.length, None, d


def speculative_step(eng) -> list[Sequence]:
    seqs = eng.running
    lagging = [s for s in seqs if s.draft is None]
    if lagging:
        catch_up(eng, lagging)
    tokens, logp, accepted, drafts = eng.runner.speculate([s.pending for s in seqs], [s.draft for s in seqs],
                                                          [s.length for s in seqs])
    # one conversion to Python for the ints, one for the floats
    ints = torch.cat([tokens, accepted.long().unsqueeze(1), drafts.unsqueeze(1)], dim=1).tolist()
    logp = logp.tolist()
    tokens, accepted, drafts = [r[:2] for r in ints], [r[2] for r in ints], [r[3] for r in ints]
    eng.stats["spec_drafts"] += len(seqs)
    for b, s in enumerate(seqs):
        s.length += 1
        eng._append(s, tokens[b][0], logp[b][0])
        if accepted[b] and not s.finish_reason:
            eng.stats["spec_accepted"] += 1
            s.length += 1
            eng._append(s, tokens[b][1], logp[b][1])
        s.mtp_len, s.draft = s.length, drafts[b]
    return list(seqs)


def acceptance_rate(eng) -> float:
    return eng.stats["spec_accepted"] / max(1, eng.stats["spec_drafts"])
