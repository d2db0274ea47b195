"""Packing documents into fixed-length training windows, in a deterministic, resumable order.

Tokenised documents (each starts with BOS and ends with EOS) are shuffled per epoch with a seed
derived from (seed, epoch), concatenated, and cut into windows of seq_len + 1 tokens (input = window[:-1],
target = window[1:]); a batch is batch_size consecutive windows.

`document_mask` turns a window into per-document positions (restarting at each BOS) and a block-causal
attention mask, so a token attends only within its own document - exactly what it sees at inference,
where a prompt starts at position 0 with nothing before it. Without it, a packed window holds several
user turns and "the first digit of *this* question" becomes an ambiguous lookup.

The whole state is (epoch, cursor): saving and restoring it reproduces the exact batch sequence, so a
resumed run sees the same tokens as an uninterrupted one.

Optional per-token loss masks travel with the tokens (packed the same way), e.g. to train on the
assistant part of chat-formatted documents only.
"""
from __future__ import annotations

import numpy as np
import torch

from ..common import UserError


class PackedLoader:
    def __init__(self, docs: list[np.ndarray], batch_size: int, seq_len: int, seed: int = 0,
                 masks: list[np.ndarray] | None = None):
        if not docs:
            raise UserError("no training documents")
        self.docs, self.B, self.T, self.seed = docs, batch_size, seq_len, seed
        self.masks = masks
        self.epoch, self.cursor = 0, 0
        self._windows: np.ndarray | None = None
        n_tokens = sum(len(d) for d in docs)
        if n_tokens < batch_size * (seq_len + 1):
            raise UserError(f"the corpus has {n_tokens} tokens, fewer than one batch "
                            f"(batch_size {batch_size} x (seq_len {seq_len} + 1)); add data or shrink the batch")

    def _build(self) -> np.ndarray:
        """(n_windows, T+1) ids, or (n_windows, 2, T+1) ids and masks."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
        stream = np.concatenate([self.docs[i] for i in order])
        n = len(stream) // (self.T + 1)
        windows = stream[: n * (self.T + 1)].reshape(n, self.T + 1)
        if self.masks is None:
            return windows
        mstream = np.concatenate([self.masks[i] for i in order]).astype(stream.dtype)
        return np.stack([windows, mstream[: n * (self.T + 1)].reshape(n, self.T + 1)], axis=1)

    @property
    def windows(self) -> np.ndarray:
        if self._windows is None:
            self._windows = self._build()
        return self._windows

    def next_batch(self):
        """(B, T+1) int64 token ids; with masks, also the (B, T+1) float loss mask of the same tokens."""
        if self.cursor + self.B > len(self.windows):
            self.epoch, self.cursor, self._windows = self.epoch + 1, 0, None
        batch = self.windows[self.cursor: self.cursor + self.B]
        self.cursor += self.B
        if self.masks is None:
            return torch.from_numpy(batch.astype(np.int64))
        return torch.from_numpy(batch[:, 0].astype(np.int64)), torch.from_numpy(batch[:, 1].astype(np.float32))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data seed {state['seed']} differs from --seed {self.seed}")
        self.epoch, self.cursor, self._windows = state["epoch"], state["cursor"], None

    @property
    def tokens_per_epoch(self) -> int:
        return self.windows.shape[0] * (self.T + 1)


def fixed_batches(docs: list[np.ndarray], batch_size: int, seq_len: int, max_batches: int,
                  masks: list[np.ndarray] | None = None) -> list:
    """Validation batches: the first windows of an unshuffled stream (the same every time);
    (ids, mask) pairs when masks are given."""
    stream = np.concatenate(docs)
    n = min(len(stream) // (seq_len + 1), batch_size * max_batches)
    if n == 0:
        return []
    w = torch.from_numpy(stream[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
    if masks is None:
        return list(w.split(batch_size))
    m = torch.from_numpy(np.concatenate(masks)[: n * (seq_len + 1)].astype(np.float32)).view(n, seq_len + 1)
    return list(zip(w.split(batch_size), m.split(batch_size)))


def document_positions(ids_BT: torch.Tensor, bos_id: int):
    """(B,T) ids -> positions (B,T) restarting at every BOS, and each token's document index (B,T)."""
    B, T = ids_BT.shape
    is_bos = ids_BT == bos_id
    doc = is_bos.cumsum(dim=1)                                            # document index per token
    idx = torch.arange(T, device=ids_BT.device).expand(B, T)
    start = torch.where(is_bos, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start, doc


def causal_document_mask(doc_BT: torch.Tensor) -> torch.Tensor:
    """(B,T) document index per token -> (B,1,T,T) bool: causal within a document, False across."""
    T = doc_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_BT.device).tril()
    return ((doc_BT.unsqueeze(2) == doc_BT.unsqueeze(1)) & causal).unsqueeze(1)


def document_mask(ids_BT: torch.Tensor, bos_id: int):
    """(B,T) ids -> positions (B,T) restarting at every BOS, and a (B,1,T,T) bool mask that is causal
    within a document and False across documents."""
    positions, doc = document_positions(ids_BT, bos_id)
    return positions, causal_document_mask(doc)
