"""Document masking for training on a GPU: FlexAttention with a block-sparse mask, applied from outside the model.

A packed training window holds several documents; each token attends causally within its own document
(`nanoseek.data.loader.document_mask`). As a dense (B,1,T,T) mask, SDPA's fused kernels (cuDNN on an
H200) read the whole mask and compute every (query, key) block, though at most half of them - the
causal half, less the cross-document ones - can contribute. FlexAttention (`torch.nn.attention.
flex_attention`) takes the mask as a rule, `doc[q] == doc[k] and k <= q`, from which a `BlockMask`
lists, per 128-query block, the key blocks that hold any allowed pair; the compiled kernel skips the
rest and applies the rule only inside partial blocks.

`DocumentMask` is what the model's attention accepts in place of a mask tensor (`MLA.forward`'s
`mask`, the `AttentionMask` protocol in `nanoseek.model.mla`): it attends itself, so the model stays
free of kernel choices. `training_mask` picks it on CUDA for long windows and the dense mask elsewhere;
a window whose rows each hold one document (no BOS after a row's first token) needs no document rule:
it gets `CausalMask`, SDPA's causal kernel with cuDNN's first (MLA's q/k 192, v 128, B8 x H16 x
T2048, forward + backward on an H200: 2.10 ms against 4.86 ms through FlexAttention on the same rows,
`bench_gpu.py` run 5). Telling costs one host sync per step, before the forward's kernels are queued
(the loss's token count, `losses.loss_norm`, syncs there too).
On CPU FlexAttention has no backward, so CPU tests check its forward against the dense path; the GPU
benchmark (`benchmarks/bench_gpu.py`) checks forward and backward on the GPU.
"""
from __future__ import annotations

import functools

import torch

from ..data.loader import causal_document_mask, document_mask, document_positions
from ..model.mla import fused_attention

FLEX_MIN_T = 1024    # shorter windows keep the dense mask: its T^2 cost is small there, and each new
                     # shape costs a FlexAttention compile (~8 s on an H200 for MLA's head dims)


@functools.cache
def _compiled_flex():
    """FlexAttention compiled once per process (eager flex_attention materialises the scores)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


class DocumentMask:
    """Causal attention within documents of (B,T) document ids, through FlexAttention."""

    def __init__(self, doc_BT: torch.Tensor, compiled: bool = True):
        """`compiled=False`: eager FlexAttention (materialises the scores; for tests)."""
        from torch.nn.attention.flex_attention import flex_attention
        self.doc = doc_BT
        self.kernel = _compiled_flex() if compiled else flex_attention     # resolved outside any compiled region
        self.block_mask = document_block_mask(doc_BT)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """q, k (B,H,T,N+R), v (B,H,T,V) -> (B,H,T,V). The inputs are made contiguous: inside a compiled
        block, inductor's CPU FlexAttention (torch 2.13) returned wrong values for MLA's transposed
        views of q, k and v (max error 1.5 on a test model; fine as contiguous tensors)."""
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        return self.kernel(q, k, v, block_mask=self.block_mask, scale=scale)

    def dense(self) -> torch.Tensor:
        """The same mask as (B,1,T,T) bool (what `document_mask` gives)."""
        return causal_document_mask(self.doc)


def cudnn_first():
    """A context in which SDPA tries cuDNN's kernel first: PyTorch's default order tries the
    memory-efficient kernel before it, and flash has no kernel for MLA's narrower v head dim."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH], set_priority=True)


class CausalMask:
    """Plain causal attention (each row one document): the model's own SDPA path (`fused_attention`)
    with cuDNN's kernel tried first. CPU: SDPA's math path (tests)."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        with cudnn_first():
            return fused_attention(q, k, v, None, scale)


def document_block_mask(doc_BT: torch.Tensor, block: int = 128):
    """The BlockMask of causal attention within documents, from the documents' extents per block: a few
    small tensor ops on (B, T/block, T/block) (`create_block_mask` evaluates the rule at all B*T*T
    pairs). On an H200 for B8 x T2048, with the document positions: 5.2 ms per step vs 8.0 ms
    (`bench_gpu.py` attention part, runs 4 and 3). Document ids never decrease along a row, so the
    key block j <= query block i holds an allowed pair iff its last document >= the query block's first,
    and is full (no rule to apply inside) iff both blocks hold one and the same document (j < i)."""
    from torch.nn.attention.flex_attention import BlockMask
    B, T = doc_BT.shape
    n = -(-T // block)
    first = doc_BT[:, ::block]                                                    # (B, n)
    last = doc_BT[:, torch.arange(1, n + 1, device=doc_BT.device).mul(block).clamp(max=T) - 1]
    i = torch.arange(n, device=doc_BT.device)
    below = i[None, :] < i[:, None]                                               # j < i, (n, n)
    touch = (last[:, None, :] >= first[:, :, None]) & (below | torch.eye(n, dtype=torch.bool, device=doc_BT.device))
    full = below & (last[:, :, None] == first[:, None, :])                        # one document over both blocks
    if T % block:
        full[:, :, -1] = False                                                    # the tail block is partial
    partial = touch & ~full

    def listed(m):                                                                # (counts, indices) per query block
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    def same_doc_causal(b, h, q, k):
        return (doc_BT[b, q] == doc_BT[b, k]) & (k <= q)
    return BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=block, mask_mod=same_doc_causal,
                                    seq_lengths=(T, T))


def training_mask(x_BT: torch.Tensor, bos_id: int, flex: bool | None = None, compiled: bool = True):
    """positions (B,T) and the document mask of a training window: when `flex` (default: on CUDA for
    windows of FLEX_MIN_T tokens or more) a `DocumentMask` (FlexAttention), or `CausalMask` if no row
    holds a second document; else the dense bool mask."""
    if flex is None:
        flex = x_BT.device.type == "cuda" and x_BT.shape[1] >= FLEX_MIN_T
    if not flex:
        return document_mask(x_BT, bos_id)
    positions, doc = document_positions(x_BT, bos_id)
    if not bool((doc[:, -1] != doc[:, 0]).any()):          # every row one document: causal is the rule
        return positions, CausalMask()
    return positions, DocumentMask(doc, compiled)
