"""Multi-Token Prediction (V3 sec. 2.2): D sequential modules, module k predicts token i+k+1.

    h'^k_i = M_k [RMSNorm_e(Emb(t_{i+k})) ; RMSNorm_h(h^{k-1}_i)]      embedding first, as the
                                                                       released weights are laid out
    h^k    = TRM_k(h'^k)                                               a full V3 block (MLA + MoE)
    P^k    = softmax(Head(RMSNorm_sh(h^k)))                            shared embedding and head
    L_MTP  = (lambda / D) sum_k CE(P^k_i, t_{i+k+1})

h^0 is the main model's last hidden state *before* the final norm (torchtitan's choice; the paper
says only "the representation given by the main model"). Positions are the original ones.
To keep shapes fixed, module k sees the whole sequence with the embeddings shifted left by k and
the last k positions padded; targets there are ignored (causal attention keeps the padding from
leaking backwards). At inference the module is a 1-token draft for speculative decoding.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm


class MTPLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, block: nn.Module):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = block
        self.norm = RMSNorm(D, cfg.rms_norm_eps)  # HF: shared_head.norm
        self.layer_id = layer_id

    def forward(self, h_BTD, emb_BTD, rot, cache=None, mask=None, routing=None):
        x = self.eh_proj(torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1))
        return self.block(x, rot, cache, mask, routing)


def shift_left(ids_BT: torch.Tensor, k: int, fill: int = 0) -> torch.Tensor:
    """ids[:, i] -> ids[:, i+k], the last k positions filled (their predictions are never scored)."""
    if k == 0:
        return ids_BT
    return torch.cat([ids_BT[:, k:], ids_BT.new_full((ids_BT.shape[0], k), fill)], dim=1)
