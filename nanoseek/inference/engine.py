"""The inference engine: continuous batching over the MLA latent cache.

    add_request(prompt_ids, params)  -> queued (n samples share one prefill: the prompt's cache row is
                                        forked n-1 times, as GRPO's G completions per prompt need)
    step()                           -> one prefill step (if requests wait and slots are free) or one
                                        decode step for every running sequence; returns sequences that
                                        got tokens this step
The engine owns the cache and the scheduling. Prefill runs the model itself; decode steps run through
its `DecodeRunner` (runner/), which derives decode weights from the model (folded MLA, fused MoE,
packed GEMMs), compiles the step when that pays, and re-derives them after the model's parameters
change: the module a GRPO optimizer updates is the module that samples the next rollouts.

Decode attends over the latent cache only ([c_KV ; k_pe] per token, queries mapped into the latent space).
Running sequences sit in cache slots 0..B-1; a finished one is replaced by the last (one row copy).
Greedy requests can use MTP speculative decoding (speculative.py) when the model has MTP weights.
"""
from __future__ import annotations

import itertools
import warnings
from collections import deque

import torch

from ..common import UserError, compute_dtype, decode_dtypes
from ..model import Transformer
from ..model.moe import RoutingRecord
from .cache import LatentCache
from .runner import DecodeRunner
from .sampling import SamplingParams, logprobs_topk, process_logits, sample
from .sequence import Sequence, Request
from .speculative import SPEC_MAX_ROWS, speculative_step


class Engine:
    def __init__(self, model: Transformer, max_batch: int = 64, max_len: int | None = None,
                 cache_dtype: torch.dtype | None = None, autocast_dtype: torch.dtype | None = None,
                 speculative: bool = False, seed: int = 0, stop_token_ids: list[int] | None = None,
                 compile: bool | str = "auto", record_routing: bool = False, tokenizer=None):
        """autocast_dtype: the compute dtype (None: measured per host - prefill in the faster of fp32
        and bf16 autocast, each decode GEMM in its fastest kernel; see `nanoseek.calibrate`).
        compile: the decode step's torch.compile policy (True / False / "auto", see runner/). A model
        whose weights `nanoseek.quant.fp8_weights.quantize_weights` converted (`LLM(weights="fp8")`) decodes
        from e4m3 weights too.
        record_routing: keep every token's experts per MoE layer on its Sequence (`routing`), for routing
        replay in RL. The runner's fused decode paths do not expose routes, so such an engine decodes
        through the model's own forward over the cache (slower) and does not speculate.
        tokenizer: the model's, needed only for structured output (`SamplingParams.grammar`)."""
        if compile not in (True, False, "auto"):
            raise UserError(f"compile={compile!r}: use True, False or 'auto' (compile a batch size once it pays)")
        cfg = model.cfg
        self.model = model
        self.device = model.device
        self.max_batch = max_batch
        self.max_len = min(max_len or 2048, cfg.max_position_embeddings)
        self.record_routing = record_routing
        self.speculative = speculative and len(model.mtp) > 0 and not record_routing
        n_layers = cfg.num_hidden_layers + (len(model.mtp) if self.speculative else 0)
        pdtype = model.embed.weight.dtype
        self.cache = LatentCache(n_layers, max_batch, self.max_len, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                 cache_dtype or autocast_dtype or pdtype, self.device,
                                 compute_dtype=autocast_dtype or pdtype)
        # an explicit compute dtype, or weights loaded in bf16/fp16, fix the precision; else it is measured
        fixed = autocast_dtype or (pdtype if pdtype != torch.float32 else None)
        self.autocast_dtype = fixed or compute_dtype(self.device, None, cfg.hidden_size, 256)
        self.runner = DecodeRunner(model, self.cache, decode_dtypes(self.device, fixed), compile=compile,
                                   max_batch=max_batch)
        self.eos_ids = set(stop_token_ids if stop_token_ids is not None else [cfg.eos_token_id])
        self.waiting: deque[Request] = deque()     # in arrival order; aborted ones are dropped when reached
        self.queued: dict[str, Request] = {}        # request id -> its Request, while it waits (not aborted)
        self.running: list[Sequence] = []
        self.gen = torch.Generator(device=self.device).manual_seed(seed)
        self._ids = itertools.count()
        self.tokenizer = tokenizer
        self._grammars = None
        self.stats = {"prefill_tokens": 0, "decode_tokens": 0, "steps": 0, "spec_drafts": 0, "spec_accepted": 0}

    def sync_weights(self) -> None:
        """The model's parameters changed (an optimizer step, a load): rebuild the decode weights now.
        A version check before every decode step catches a missing call; this makes it explicit."""
        self.runner.sync_weights()

    @property
    def grammars(self):
        """The structured-output matcher factory (structured.Grammars), built on first use."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise UserError("structured output (SamplingParams.grammar) needs the model's tokenizer: "
                                "pass tokenizer= to the Engine (LLM does)")
            from .structured import Grammars
            self._grammars = Grammars(self.tokenizer, self.model.cfg.vocab_size, sorted(self.eos_ids))
        return self._grammars

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
        matcher = self.grammars.matcher(params.grammar) if params.grammar is not None else None
        if rid in self.queued or any(s.request_id == rid for s in self.running):
            raise UserError(f"request id {rid!r} is already in use")
        self.queued[rid] = Request(rid, list(prompt_ids), params, matcher)
        self.waiting.append(self.queued[rid])
        return rid

    def has_work(self) -> bool:
        return bool(self.queued or self.running)

    def abort(self, request_ids: str | list[str]) -> None:
        """Drop requests: queued ones are marked (O(1) each, skipped when the queue reaches them), running
        ones finish with "abort". The cost is the aborted requests' own, whatever else is queued."""
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        for rid in ids:
            r = self.queued.pop(rid, None)
            if r is not None:
                r.aborted, r.matcher = True, None
        if not self.queued:
            self.waiting.clear()
        for s in self.running:
            if s.request_id in ids:
                s.finish_reason = "abort"
        self._compact()

    def _next_waiting(self) -> Request | None:
        while self.waiting and self.waiting[0].aborted:
            self.waiting.popleft()
        return self.waiting[0] if self.waiting else None

    def finish(self, seq: Sequence, reason: str = "stop") -> None:
        """Mark a sequence finished from outside (e.g. a stop string); it leaves at the next step."""
        seq.finish_reason = reason

    def step(self) -> list[Sequence]:
        self._compact()              # sequences finished from outside since the last step
        if not self.running and not self.queued:       # e.g. a stop string ended the last sequence
            return []
        self.stats["steps"] += 1
        head = self._next_waiting()
        if head is not None and head.params.n <= self.max_batch - len(self.running):
            out = self._prefill()
        elif self.speculative and 0 < len(self.running) <= SPEC_MAX_ROWS and \
                all(s.params.greedy and not s.params.processed and s.matcher is None and not s.params.logprobs
                    and len(s.out_ids) >= s.params.min_tokens for s in self.running):
            out = speculative_step(self)
        else:
            out = self._decode()
        self._compact()
        return out

    # ---------------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, starts: torch.Tensor, row0: int = 0, routing=None) -> torch.Tensor:
        """Run the main model on (B,T) new tokens for slots row0.. ; returns hidden (B,T,D)."""
        self.cache.begin(starts, ids.shape[1], row0)
        with torch.no_grad(), self._autocast():
            return self.model.hidden(ids, self.cache.positions, self.cache, routing=routing)

    def _routes(self, rec, B: int, T: int) -> torch.Tensor | None:
        """A RoutingRecord of one forward over (B,T) tokens -> expert ids (n_moe, B, T, K), or None."""
        if rec is None or not len(rec):
            return None
        return torch.stack([idx.view(B, T, -1) for _, idx in rec])

    def _autocast(self):
        if self.autocast_dtype == torch.float32:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return self.model.logits(h).float()

    def _prefill(self) -> list[Sequence]:
        groups, budget, free = [], 8192, self.max_batch - len(self.running)
        while (r := self._next_waiting()) is not None and r.params.n <= free - sum(g.params.n for g in groups) \
                and (not groups or budget >= len(r.prompt_ids)):
            self.waiting.popleft()
            del self.queued[r.request_id]
            groups.append(r)
            budget -= len(r.prompt_ids)
        row0 = len(self.running)
        B, T = len(groups), max(len(r.prompt_ids) for r in groups)
        ids = torch.zeros(B, T, dtype=torch.long)
        for i, r in enumerate(groups):
            ids[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        lens = torch.tensor([len(r.prompt_ids) for r in groups], device=self.device)
        rec = RoutingRecord() if self.record_routing else None
        h = self._forward(ids.to(self.device), torch.zeros(B, dtype=torch.long, device=self.device), row0, rec)
        routes = self._routes(rec, B, T)
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
                matcher = r.matcher if j == 0 or r.matcher is None else r.matcher.deep_copy()   # one per sample
                seqs.append(Sequence(r.request_id, j, r.prompt_ids, r.params, gen, slot=slot,
                                     length=len(r.prompt_ids), matcher=matcher,
                                     routing=None if routes is None else [routes[:, i, : len(r.prompt_ids)]]))
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

    def _decode(self) -> list[Sequence]:
        seqs = self.running
        if self.record_routing:
            return self._decode_recorded(seqs)
        logits, tokens, logps, h = self.runner.decode([s.pending for s in seqs], [s.length for s in seqs])
        if self.speculative:       # plain steps of a speculative engine keep the main hidden states
            for i, s in enumerate(seqs):
                s.hidden = torch.cat([s.hidden, h[i: i + 1]]) if s.hidden is not None else h[i: i + 1]
                s.draft = None             # the MTP cache now lags: the next speculative step catches up
        greedy = (tokens, logps)
        for s in seqs:
            s.length += 1
        self._emit(seqs, logits, greedy)
        return list(seqs)

    def _decode_recorded(self, seqs: list[Sequence]) -> list[Sequence]:
        """A decode step through the model's own forward, keeping each row's experts."""
        ids = torch.tensor([[s.pending] for s in seqs], device=self.device)
        rec = RoutingRecord()
        h = self._forward(ids, torch.tensor([s.length for s in seqs], device=self.device), 0, rec)
        routes = self._routes(rec, len(seqs), 1)
        for i, s in enumerate(seqs):
            s.length += 1
        if routes is not None:
            for i, s in enumerate(seqs):
                s.routing.append(routes[:, i])
        self._emit(seqs, self._logits(h[:, 0]))
        return list(seqs)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor, greedy=None) -> None:
        """Sample one token per sequence from logits (B,V) and apply the stop rules. `greedy`: the
        (tokens, log-probs) of argmax sampling when the compiled step already computed them."""
        P = [s.params for s in seqs]
        matchers = [s.matcher for s in seqs]
        constrained = any(m is not None for m in matchers)
        if constrained:                # structured output: only the tokens each grammar allows next
            logits = self.grammars.mask_(logits, matchers)
        # suppress EOS before min_tokens (a grammar decides for itself when its document may end)
        suppress = [i for i, s in enumerate(seqs) if len(s.out_ids) < s.params.min_tokens and s.matcher is None]
        for i in suppress:
            for e in self.eos_ids:
                logits[i, e] = float("-inf")
        processed = any(p.processed for p in P)
        if processed:
            logits = process_logits(logits.float(), P, [s.prompt_ids for s in seqs], [s.out_ids for s in seqs])
        all_greedy = all(p.greedy for p in P)
        temps = None
        if all_greedy and greedy is not None and not suppress and not processed and not constrained:
            tokens, logps = greedy
        else:
            temps = torch.tensor([p.temperature for p in P], device=logits.device)
            top_ps = torch.tensor([p.top_p for p in P], device=logits.device) if any(p.top_p < 1 for p in P) \
                else None
            top_ks = torch.tensor([max(p.top_k, 0) for p in P], device=logits.device) \
                if any(p.top_k > 0 for p in P) else None
            min_ps = torch.tensor([p.min_p for p in P], device=logits.device) if any(p.min_p > 0 for p in P) \
                else None
            tokens, logps = sample(logits, temps, top_ps, top_ks, [s.generator for s in seqs], self.gen,
                                   all_greedy=all_greedy and min_ps is None, min_ps=min_ps)
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
        elif s.matcher is not None and not s.matcher.consume_token(tok):
            # the grammar engine gave up (a resource limit): end here, truncated, rather than sample blind
            warnings.warn(f"structured output stopped early: {s.matcher.get_error()[:300]}")
            s.finish_reason = "length"
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
