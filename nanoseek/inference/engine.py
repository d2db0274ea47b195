"""The inference engine: continuous batching over the MLA latent cache.

    add_request(prompt_ids, params)  -> queued (n samples share one prefill: the prompt's cache row is
                                        forked n-1 times, as GRPO's G completions per prompt need)
    step()                           -> one prefill step (if requests wait and slots are free) or one
                                        decode step for every running sequence; returns sequences that
                                        got tokens this step
The engine owns the cache and the scheduling and calls the model; it never copies weights, so the
module a GRPO optimizer updates is the module that samples the next rollouts.

Decode uses absorbed MLA (queries mapped into the latent space, attention over [c_KV ; k_pe] only).
Running sequences sit in cache slots 0..B-1; a finished one is replaced by the last (one row copy).
Greedy requests can use MTP speculative decoding (speculative.py) when the model has MTP weights.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from ..common import UserError
from ..model import Transformer, kernels
from ..model.moe import MoE
from .cache import LatentCache
from .sampling import SamplingParams, logprobs_topk, sample


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
    stop_text: bool = False              # finished by a stop string (text truncated by the caller)


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class Engine:
    def __init__(self, model: Transformer, max_batch: int = 64, max_len: int | None = None,
                 cache_dtype: torch.dtype | None = None, autocast_dtype: torch.dtype | None = None,
                 speculative: bool = False, seed: int = 0, stop_token_ids: list[int] | None = None,
                 compile: bool = False):
        cfg = model.cfg
        self.model = model
        self.device = model.device
        self.max_batch = max_batch
        self.max_len = min(max_len or 2048, cfg.max_position_embeddings)
        self.speculative = speculative and len(model.mtp) > 0
        n_layers = cfg.num_hidden_layers + (len(model.mtp) if self.speculative else 0)
        pdtype = model.embed.weight.dtype
        self.cache = LatentCache(n_layers, max_batch, self.max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                 cache_dtype or autocast_dtype or pdtype, self.device,
                                 compute_dtype=autocast_dtype or pdtype)
        self.autocast_dtype = autocast_dtype
        self.eos_ids = set(stop_token_ids if stop_token_ids is not None else [cfg.eos_token_id])
        self.waiting: deque[_Request] = deque()
        self.running: list[Sequence] = []
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self._ids = itertools.count()
        # compile=True: decode steps run as one torch.compile'd graph: rows padded to a power of two
        # (one compilation per batch bucket, ~5-20 s each on 2 CPU cores), attention over the live cache
        # length rounded up to 32 (a dynamic dimension: no recompiles as sequences grow), MKL-prepacked
        # linears and the fused dense MoE for small batches, the sorted MoE paths as one opaque op.
        # cpp_wrapper: inductor writes the code that calls the step's ~100 kernels in C++ instead of
        # Python (measured +9% tokens/s at batch 8, +5% at 64; compiles take ~15 s longer)
        self._compiled = torch.compile(self._decode_graph, dynamic=None, fullgraph=True,
                                       options={"cpp_wrapper": True}) if compile else None
        if compile and self.device.type == "cpu":
            kernels.load_native()
        self._compile_failed: set[int] = set()     # buckets that could not compile run eagerly
        self._weights_key: list | None = None      # parameter versions the derived weights were built from
        self._param_slots = [(m._parameters, n) for m in model.modules() for n, p in m._parameters.items()
                             if p is not None]
        self._spans: dict[int, torch.Tensor] = {}   # attention span S -> an empty (S,) tensor, S marked dynamic
        if compile:   # one compilation per bucket (1, 2, 4, ... max_batch), plus room for other engines
            import torch._dynamo as dynamo
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 4 * (max_batch.bit_length() + 1))
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "spec_drafts": 0, "spec_accepted": 0}

    # ---------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        rid = request_id if request_id is not None else str(next(self._ids))
        if not prompt_ids:
            raise UserError("empty prompt: give at least one token")
        if len(prompt_ids) >= self.max_len:
            raise UserError(f"prompt has {len(prompt_ids)} tokens but the context is {self.max_len}; "
                            "shorten the prompt")
        if params.n > self.max_batch:
            raise UserError(f"n={params.n} exceeds the engine's max_batch={self.max_batch}")
        V = self.model.cfg.vocab_size
        if any(not 0 <= t < V for t in prompt_ids):
            raise UserError(f"prompt token ids must be in [0, {V})")
        self.waiting.append(_Request(rid, list(prompt_ids), params))
        return rid

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
        for s in self.running:
            if s.request_id == request_id:
                s.finish_reason = "abort"
        self._compact()

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """Mark a sequence finished from outside (e.g. a stop string); it leaves at the next step."""
        seq.finish_reason = reason

    def step(self) -> list[Sequence]:
        self._compact()              # sequences finished from outside since the last step
        if not self.running and not self.waiting:      # e.g. a stop string ended the last sequence
            return []
        self.stats["steps"] += 1
        if self.waiting and self.waiting[0].params.n <= self.max_batch - len(self.running):
            out = self._prefill()
        elif self.speculative and self.running and all(s.params.greedy for s in self.running):
            from .speculative import speculative_step
            out = speculative_step(self)
        else:
            out = self._decode()
        self._compact()
        return out

    # ---------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, starts: torch.Tensor, row0: int = 0) -> torch.Tensor:
        """Run the main model on (B,T) new tokens for slots row0.. ; returns hidden (B,T,D)."""
        self.cache.begin(starts, ids.shape[1], row0)
        with torch.no_grad(), self._autocast():
            return self.model.hidden(ids, self.cache.positions, self.cache)

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.model.logits(h).float()

    def _prefill(self) -> list[Sequence]:
        groups, budget, free = [], 8192, self.max_batch - len(self.running)
        while self.waiting and self.waiting[0].params.n <= free - sum(r.params.n for r in groups) and \
                (not groups or budget >= len(self.waiting[0].prompt_ids)):
            r = self.waiting.popleft()
            groups.append(r)
            budget -= len(r.prompt_ids)
        row0 = len(self.running)
        B, T = len(groups), max(len(r.prompt_ids) for r in groups)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, r in enumerate(groups):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        lens = torch.tensor([len(r.prompt_ids) for r in groups], device=self.device)
        h = self._forward(ids.to(self.device), torch.zeros(B, dtype=torch.long, device=self.device), row0)
        last = h[torch.arange(B, device=self.device), lens - 1]                                  # (B,D)
        self.stats["prefill_tokens"] += int(lens.sum())
        # one sequence per sample: sample 0 in the prefilled row, samples 1..n-1 in forked rows
        seqs, src_rows, next_slot = [], [], row0 + B
        for i, r in enumerate(groups):
            fork_slots = list(range(next_slot, next_slot + r.params.n - 1))
            next_slot += r.params.n - 1
            self.cache.fork(row0 + i, fork_slots, len(r.prompt_ids))
            for j, slot in enumerate([row0 + i] + fork_slots):
                gen = None
                if r.params.seed is not None:
                    gen = torch.Generator(device=self.device).manual_seed(r.params.seed + j)
                seqs.append(Sequence(r.request_id, j, r.prompt_ids, r.params, gen, slot=slot,
                                     length=len(r.prompt_ids)))
                src_rows.append(i)
        order = sorted(range(len(seqs)), key=lambda k: seqs[k].slot)
        seqs, src_rows = [seqs[k] for k in order], [src_rows[k] for k in order]
        self.running.extend(seqs)          # running[k].slot == k stays true
        src = torch.tensor(src_rows, device=self.device)
        if self.speculative:      # main hidden states of every prompt position feed the MTP draft
            for s, i in zip(seqs, src_rows):
                s.hidden = h[i, : len(s.prompt_ids)]
        self._emit(seqs, self._logits(last)[src])
        return seqs

    def _decode_graph(self, ids: torch.Tensor, starts: torch.Tensor, span: torch.Tensor):
        """The compiled step: logits (B,V) fp32, plus the greedy token and its logit (fused in-graph)."""
        self.cache.begin(starts, 1, 0, span=span.shape[0])
        logits = self.model.logits(self.model.hidden(ids, self.cache.positions, self.cache)[:, 0]).float()
        best, tokens = logits.max(dim=-1)
        return logits, tokens, best

    def _compiled_bucket(self, B: int) -> int | None:
        """Padded batch size (a power of two) for the compiled step, or None to run eagerly."""
        if self._compiled is None or self.speculative:
            return None
        Bp = 1 << (B - 1).bit_length()
        return Bp if Bp <= self.max_batch and Bp not in self._compile_failed else None

    def _refresh_derived_weights(self) -> None:
        """Recompute the folded MLA / fused MoE weights (in place) if any parameter changed since the
        last step (an optimizer step, a load, a replaced Parameter): one identity/version/address check
        per parameter slot of the modules of construction time (a swapped-in submodule is not seen)."""
        key = [(id(p), p._version, p.data_ptr()) for d, name in self._param_slots for p in (d[name],)]
        if key == self._weights_key:
            return
        fused = self.device.type == "cpu" and self.autocast_dtype is None and \
            self.model.embed.weight.dtype == torch.float32          # where the fused MoE paths can run
        for layer in self.model.layers:
            layer.attn.folded_weights()
            if fused and isinstance(layer.ffn, MoE):
                layer.ffn.fused_weights()
        self._weights_key = key

    def _compiled_logits(self, pending: list[int], lengths: list[int]):
        """(logits (B,V), greedy tokens, their log-probs) from the compiled step, or None
        where the step runs eagerly."""
        B = len(pending)
        Bp = self._compiled_bucket(B)
        if Bp is None:
            return None
        # rows B..Bp-1 are free cache slots: their dummy token lands at position 0 and is overwritten
        # by the next prefill that takes the slot. Dummies copy real rows' tokens so that they route
        # like real tokens (identical dummies would all pick the same experts and overflow the MoE's
        # capacity path)
        ids = torch.tensor(pending + [pending[i % B] for i in range(Bp - B)], device=self.device).view(Bp, 1)
        starts = torch.tensor(lengths + [0] * (Bp - B), device=self.device)
        # the attention span (live cache length rounded up to 32) is the graph's one dynamic
        # dimension, passed as the length of an empty tensor; the batch stays static (buckets)
        S = min(self.max_len, (max(lengths) + 32) // 32 * 32)
        span = self._spans.get(S)
        if span is None:
            span = self._spans[S] = torch.empty(S, device=self.device)
            torch._dynamo.mark_dynamic(span, 0)
        torch._dynamo.mark_static(ids, 0)
        torch._dynamo.mark_static(starts, 0)
        self._refresh_derived_weights()
        try:
            with torch.no_grad(), self._autocast():
                kernels.ENGINE_STEP = True
                try:
                    logits, tokens, best = self._compiled(ids, starts, span)
                finally:
                    kernels.ENGINE_STEP = False
        except Exception as e:          # a bucket torch cannot compile (limits, backend): run eagerly
            import warnings
            warnings.warn(f"compiled decode failed for batch {Bp} ({type(e).__name__}); using eager")
            self._compile_failed.add(Bp)
            return None
        # the log-prob's logsumexp runs eagerly: inductor's exp is ~2.5x slower than ATen's here
        # (measured 0.24 ms in-graph vs 0.12 ms eager for 64 x 4096 logits)
        logits = logits[:B]
        return logits, tokens[:B], best[:B] - torch.logsumexp(logits, dim=-1)

    def _decode(self) -> list[Sequence]:
        seqs = self.running
        pending, lengths = [s.pending for s in seqs], [s.length for s in seqs]
        out, greedy = self._compiled_logits(pending, lengths), None
        if out is not None:
            logits, greedy = out[0], out[1:]
        else:
            ids = torch.tensor(pending, device=self.device).view(-1, 1)
            h = self._forward(ids, torch.tensor(lengths, device=self.device))
            if self.speculative:
                for i, s in enumerate(seqs):
                    s.hidden = torch.cat([s.hidden, h[i, :1]]) if s.hidden is not None else h[i, :1]
            logits = self._logits(h[:, 0])
        for s in seqs:
            s.length += 1
        self._emit(seqs, logits, greedy)
        return list(seqs)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor, greedy=None) -> None:
        """Sample one token per sequence from logits (B,V) and apply the stop rules. `greedy`: the
        (tokens, log-probs) of argmax sampling when the compiled step already computed them."""
        P = [s.params for s in seqs]
        suppress = [i for i, s in enumerate(seqs) if len(s.out_ids) < s.params.min_tokens]
        for i in suppress:             # suppress EOS before min_tokens
            for e in self.eos_ids:
                logits[i, e] = float("-inf")
        all_greedy = all(p.greedy for p in P)
        temps = None
        if all_greedy and greedy is not None and not suppress:
            tokens, logps = greedy
        else:
            temps = torch.tensor([p.temperature for p in P], device=logits.device)
            top_ps = torch.tensor([p.top_p for p in P], device=logits.device) if any(p.top_p < 1 for p in P) \
                else None
            top_ks = torch.tensor([max(p.top_k, 0) for p in P], device=logits.device) \
                if any(p.top_k > 0 for p in P) else None
            tokens, logps = sample(logits, temps, top_ps, top_ks, [s.generator for s in seqs], self.gen,
                                   all_greedy=all_greedy)
        tokens, logps = tokens.tolist(), logps.tolist()
        for i, s in enumerate(seqs):
            top = None
            if s.params.logprobs:
                t = torch.tensor(s.params.temperature) if temps is None else temps[i]
                top = logprobs_topk(logits[i], t, s.params.logprobs)
            self._append(s, tokens[i], logps[i], top)

    def _append(self, s: Sequence, tok: int, logp: float, top: dict | None = None) -> None:
        s.out_ids.append(tok)
        s.logprobs.append(logp)
        if top is not None:
            s.top_logprobs.append(top)
        s.pending = tok
        p = s.params
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            s.finish_reason = "stop"
        elif len(s.out_ids) >= p.max_tokens or s.length + 1 >= self.max_len:
            s.finish_reason = "length"
        self.stats["decode_tokens"] += 1

    def _compact(self) -> None:
        """Remove finished sequences, keeping the running ones in slots 0..B-1."""
        done = sorted((s for s in self.running if s.finish_reason), key=lambda s: -s.slot)
        for s in done:
            last = self.running[-1]
            if last is not s:
                self.cache.move(last.slot, s.slot, max(last.length, last.mtp_len))
                last.slot = s.slot
                self.running[s.slot] = last
            self.running.pop()
