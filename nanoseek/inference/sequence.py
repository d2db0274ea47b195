"""What the engine tracks per running sample (`Sequence`) and per queued request."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams


@dataclass
class Sequence:
    request_id: str
    index: int                       # which of the request's n samples
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    slot: int = -1
    length: int = 0                  # tokens in the main cache
    pending: int | None = None       # sampled, emitted, not yet in the cache
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None
    hidden: torch.Tensor | None = None   # speculative: main hidden states of positions [mtp_len, length)
    mtp_len: int = 0                     # positions already in the MTP cache
    draft: int | None = None             # speculative: the MTP module's guess for the token after `pending`
    stop_text: bool = False              # finished by a stop string (text truncated by the caller)
    routing: list | None = None          # record_routing: (n_moe, t, K) expert ids per forward, in order
    matcher: object | None = None        # structured output: this sample's llguidance matcher


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    matcher: object | None = None        # structured output: the grammar's matcher (made, so checked, at add_request)
    aborted: bool = False                # aborted while queued: skipped when the queue reaches it
