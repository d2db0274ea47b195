"""Sampling parameters and the batched sampler.

`SamplingParams` mirrors vLLM's so code and benchmarks can switch engines. Contracts kept:
temperature 0 means greedy; `seed` makes one request's samples reproducible whatever else is in the
batch; the returned log-prob of a token is log softmax(logits / T) at that token (T = 1 for greedy,
which is any T below GREEDY_EPS) -
the probability it was sampled with before top-k/top-p truncation, which is also what the GRPO
trainer recomputes for the importance ratio.

Sampling uses the Gumbel-max trick (argmax of logits/T + Gumbel noise == a draw from softmax(logits/T)),
so a whole batch with mixed temperatures is one vectorised op; rows with their own seed draw their
noise from their own generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common import UserError

# temperatures below this sample greedily (vLLM's rule): logits / 1e-300 overflow to +-inf, and a row whose
# allowed logits are all negative would become all -inf, where argmax returns token 0
GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 or 0: off
    max_tokens: int = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None          # None: none; 0: the sampled token's; k > 0: also the top k
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0        # OpenAI: - p * [token already in the output]
    frequency_penalty: float = 0.0       # OpenAI: - f * (times the token is in the output)
    repetition_penalty: float = 1.0      # HF/vLLM: logits of tokens in prompt or output divided (>0) / multiplied by r
    min_p: float = 0.0                   # drop tokens less likely than min_p x the most likely one
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    grammar: str | None = None           # structured output: llguidance grammar text (see structured.py)

    @property
    def processed(self) -> bool:
        """Does this request change the logits before sampling?"""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        checks = [("n", self.n >= 1, ">= 1"), ("temperature", self.temperature >= 0, ">= 0"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", -1 <= self.top_k < 2**31, "-1, 0 (off) or a positive int32"),
                  ("max_tokens", self.max_tokens >= 1, ">= 1"), ("min_tokens", self.min_tokens >= 0, ">= 0"),
                  ("logprobs", self.logprobs is None or self.logprobs >= 0, ">= 0"),
                  ("seed", self.seed is None or 0 <= self.seed < 2**63 - 2**16, "in [0, 2^63)"),
                  ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
                  ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
                  ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                  ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
                  ("logit_bias", all(isinstance(k, int) and -100 <= v <= 100 for k, v in self.logit_bias.items()),
                   "token id -> a bias in [-100, 100]"),
                  ("grammar", self.grammar is None or isinstance(self.grammar, str),
                   "None or grammar text from nanoseek.inference.structured")]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"SamplingParams.{name}={getattr(self, name)!r}: must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS


def process_logits(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                   outputs: list[list[int]]) -> torch.Tensor:
    """Penalties and biases of a batch (B,V), in place and vectorised: repetition (HF/vLLM: over prompt
    and output), presence and frequency (OpenAI: over the output), then logit_bias."""
    B, V = logits.shape
    dev = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if (rep != 1).any():
        seen = torch.zeros(B, V, dtype=torch.bool, device=dev)
        for i, (pr, out) in enumerate(zip(prompts, outputs)):
            if rep[i] != 1:
                seen[i, torch.tensor(pr + out, dtype=torch.long, device=dev)] = True
        r = rep.unsqueeze(1)
        logits.copy_(torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits))
    pres = torch.tensor([p.presence_penalty for p in params], device=dev)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev)
    if pres.any() or freq.any():
        counts = torch.zeros(B, V, device=dev)
        for i, out in enumerate(outputs):
            if out:
                counts[i].index_add_(0, torch.tensor(out, dtype=torch.long, device=dev), torch.ones(len(out), device=dev))
        logits -= freq.unsqueeze(1) * counts + pres.unsqueeze(1) * (counts > 0)
    for i, p in enumerate(params):
        for tok, bias in p.logit_bias.items():
            if 0 <= tok < V:
                logits[i, tok] += bias
    return logits


def sample(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor | None, top_ks: torch.Tensor | None,
           generators: list[torch.Generator | None], default_gen: torch.Generator | None = None,
           all_greedy: bool = False, min_ps: torch.Tensor | None = None):
    """logits (B,V) -> (tokens (B,), logprobs (B,)). temps 0 = greedy rows."""
    logits = logits.float()
    if all_greedy:   # fast path: no noise, no sorting (max(dim) ~1.6x faster than argmax on CPU; same ties)
        best, tokens = logits.max(dim=-1)
        return tokens, best - torch.logsumexp(logits, dim=-1)
    greedy = temps < GREEDY_EPS
    t = torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
    scaled = logits / t
    masked = scaled
    if top_ks is not None:
        k = top_ks.clamp(max=logits.shape[1]).unsqueeze(1)
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (k - 1).clamp(min=0))
        masked = masked.masked_fill((masked < kth) & (k > 0), float("-inf"))
    if min_ps is not None:               # min-p: relative to the most likely token, after temperature
        probs = scaled.softmax(dim=-1)
        masked = masked.masked_fill(probs < min_ps.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    if top_ps is not None:
        sorted_logits, order = masked.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1) - probs              # mass strictly before each token
        drop_sorted = cum >= top_ps.unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        masked = masked.masked_fill(drop, float("-inf"))
    u = torch.empty_like(masked)
    if any(g is not None for g in generators):
        for i, g in enumerate(generators):
            u[i].uniform_(generator=g if g is not None else default_gen)
    else:
        u.uniform_(generator=default_gen)
    gumbel = -torch.log((-torch.log(u.clamp_(1e-20, 1.0))).clamp_(min=1e-20))
    tokens = torch.where(greedy, logits.argmax(dim=-1), (masked + gumbel).argmax(dim=-1))
    logp = scaled.gather(1, tokens.unsqueeze(1)).squeeze(1) - torch.logsumexp(scaled, dim=-1)
    return tokens, logp


def logprobs_topk(logits: torch.Tensor, temps: torch.Tensor, k: int):
    """Top-k log-probs of softmax(logits / T) for one row (OpenAI `top_logprobs`)."""
    t = temps if float(temps) >= GREEDY_EPS else torch.ones_like(temps)
    lp = torch.log_softmax(logits.float() / t, dim=-1)
    top = lp.topk(k)
    return dict(zip(top.indices.tolist(), top.values.tolist()))
