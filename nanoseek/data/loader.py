"""Packing documents into fixed-length training windows, in a deterministic, resumable order.

Tokenised documents (each starts with BOS and ends with EOS) are shuffled per epoch with a seed
derived from (seed, epoch), concatenated, and cut into windows of seq_len + 1 tokens (input = window[:-1],
target = window[1:]); a batch is batch_size consecutive windows. Attention is causal across document
boundaries (GPT-style packing); EOS tells the model where a document ends.

The whole state is (epoch, cursor): saving and restoring it reproduces the exact batch sequence, so a
resumed run sees the same tokens as an uninterrupted one.
"""
from __future__ import annotations

import numpy as np
import torch

from ..common import UserError


class PackedLoader:
    def __init__(self, docs: list[np.ndarray], batch_size: int, seq_len: int, seed: int = 0):
        if not docs:
            raise UserError("no training documents")
        self.docs, self.B, self.T, self.seed = docs, batch_size, seq_len, seed
        self.epoch, self.cursor = 0, 0
        self._windows: np.ndarray | None = None
        n_tokens = sum(len(d) for d in docs)
        if n_tokens < batch_size * (seq_len + 1):
            raise UserError(f"the corpus has {n_tokens} tokens, fewer than one batch "
                            f"(batch_size {batch_size} x (seq_len {seq_len} + 1)); add data or shrink the batch")

    def _build(self) -> np.ndarray:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.docs))
        stream = np.concatenate([self.docs[i] for i in order])
        n = len(stream) // (self.T + 1)
        return stream[: n * (self.T + 1)].reshape(n, self.T + 1)

    @property
    def windows(self) -> np.ndarray:
        if self._windows is None:
            self._windows = self._build()
        return self._windows

    def next_batch(self) -> torch.Tensor:
        """(B, T+1) int64 token ids."""
        if self.cursor + self.B > len(self.windows):
            self.epoch, self.cursor, self._windows = self.epoch + 1, 0, None
        batch = self.windows[self.cursor: self.cursor + self.B]
        self.cursor += self.B
        return torch.from_numpy(batch.astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data seed {state['seed']} differs from --seed {self.seed}")
        self.epoch, self.cursor, self._windows = state["epoch"], state["cursor"], None

    @property
    def tokens_per_epoch(self) -> int:
        return self.windows.size


def fixed_batches(docs: list[np.ndarray], batch_size: int, seq_len: int, max_batches: int) -> list[torch.Tensor]:
    """Validation batches: the first windows of an unshuffled stream (the same every time)."""
    stream = np.concatenate(docs)
    n = min(len(stream) // (seq_len + 1), batch_size * max_batches)
    if n == 0:
        return []
    w = torch.from_numpy(stream[: n * (seq_len + 1)].astype(np.int64)).view(n, seq_len + 1)
    return list(w.split(batch_size))
