"""`LLM` and its outputs, shaped like vLLM's offline API so users and benchmarks can switch engines.

    llm = LLM("runs/r1-zero/final")
    outs = llm.generate(["<｜User｜>2+2=?<｜Assistant｜>"], SamplingParams(temperature=0, max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .logprobs, .finish_reason

Prompts are strings (tokenised; BOS added if missing) or {"prompt_token_ids": [...]}. Stop strings
are checked on the decoded text; the returned text is cut before the stop string.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..common import UserError, parse_dtype, progress
from ..model import Transformer
from .engine import Engine, Sequence
from .sampling import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[float] | None
    finish_reason: str | None
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


class LLM:
    def __init__(self, model: str | Transformer, tokenizer=None, dtype: str | torch.dtype | None = None,
                 device: str | None = None, max_batch: int = 64, max_len: int | None = None,
                 kv_cache_dtype: str | None = None, speculative: bool = False, seed: int = 0,
                 autocast_dtype: str | torch.dtype | None = None, compile: bool | str = "auto",
                 weights: str | None = None):
        """dtype: the weights' dtype (default: as saved). autocast_dtype: the compute dtype (default:
        measured per host, see `nanoseek.calibrate`). compile: the decode step's torch.compile policy -
        "auto" (compile a batch size once decoding it eagerly has taken as long as compiling it is
        expected to), True (on first use; `llm.engine.runner.warmup()` compiles up front) or False.
        weights: None (as loaded) or "fp8": the block linears and experts held as e4m3 + 128x128 block
        scales (half the memory of bf16), dequantized per GEMM."""
        if weights not in (None, "fp8"):
            raise UserError(f"weights={weights!r}: use None (as loaded) or 'fp8' (weight-only FP8)")
        if isinstance(model, Transformer):
            self.model = model
        else:
            from ..checkpoint.hf import from_pretrained
            from ..common import autodetect_device
            self.model = from_pretrained(model, dtype=parse_dtype(dtype), device=autodetect_device(device))
            if tokenizer is None:
                from ..tokenizer import Tokenizer
                try:
                    tokenizer = Tokenizer.load(model)
                except FileNotFoundError:
                    tokenizer = None     # no tokenizer files: token-id prompts still work
                except ValueError as e:
                    raise UserError(f"{model}: tokenizer files are invalid: {e}") from None
        self.tokenizer = tokenizer
        if weights == "fp8":
            from ..quant.fp8_weights import quantize_weights
            quantize_weights(self.model)
        cache_dtype = {"fp8": torch.float8_e4m3fn, "auto": None, None: None}.get(kv_cache_dtype, None)
        if kv_cache_dtype not in ("fp8", "auto", None):
            cache_dtype = parse_dtype(kv_cache_dtype)
        eos = [self.model.cfg.eos_token_id]
        self.engine = Engine(self.model, max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype,
                             autocast_dtype=parse_dtype(autocast_dtype), speculative=speculative, seed=seed,
                             stop_token_ids=eos, compile=compile, tokenizer=tokenizer)

    # ---------------------------------------------------------------------------------------------
    def encode_prompt(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise UserError("a dict prompt needs 'prompt_token_ids'")
            return None, [int(t) for t in prompt["prompt_token_ids"]]
        if not isinstance(prompt, str):
            raise UserError(f"prompts must be strings or {{'prompt_token_ids': [...]}}, got {type(prompt).__name__}")
        if self.tokenizer is None:
            raise UserError("this model directory has no tokenizer; pass {'prompt_token_ids': [...]} prompts")
        ids = self.tokenizer.encode(prompt)
        bos = self.model.cfg.bos_token_id
        if bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids
        return prompt, ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        eng = self.engine
        reqs: dict[str, RequestOutput] = {}
        order = []
        for i, (p, sp) in enumerate(zip(prompts, plist)):
            text, ids = self.encode_prompt(p)
            rid = f"gen-{id(self)}-{i}"
            eng.add_request(ids, sp, rid)
            reqs[rid] = RequestOutput(rid, text, ids, [None] * sp.n)
            order.append(rid)
        total = sum(sp.n for sp in plist)
        bar = progress(total=total, desc="generate", disable=not use_tqdm or None)
        while eng.has_work():
            for s in eng.step():
                self.check_stop_strings(s)
                if s.finish_reason:
                    reqs[s.request_id].outputs[s.index] = self.to_output(s)
                    bar.update(1)
        bar.close()
        return [reqs[r] for r in order]

    @torch.no_grad()
    def prompt_logprobs(self, prompts: list[list[int]], top: int | None = None, max_tokens: int = 8192,
                        head_rows: int = 512) -> list[tuple[list, list]]:
        """Each prompt's token log-probs under the model (temperature 1): None for the first token, then
        log p(t_i | t_<i); with `top`, the `top` most likely tokens at each position too (None first), as
        lm-eval's loglikelihood requests need (`echo` + `logprobs`).

        Batched: prompts of similar length share a forward (right-padded; causal attention keeps padding from
        touching real positions), up to `max_tokens` tokens a forward. The output head and log-softmax run
        `head_rows` positions at a time, so memory is (head_rows, V), never (T, V) for a long prompt. In the
        engine's compute precision (what the server's `echo` returns)."""
        model, V = self.model, self.model.cfg.vocab_size
        for k, ids in enumerate(prompts):
            if not ids or any(not 0 <= t < V for t in ids):
                raise UserError(f"prompt_logprobs: prompt {k} must be a non-empty list of token ids in [0, {V})")
        out: list = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        groups, group = [], []
        for i in order:
            if group and (len(group) + 1) * len(prompts[i]) > max_tokens:
                groups.append(group)
                group = []
            group.append(i)
        groups += [group] if group else []
        for group in groups:
            lens = [len(prompts[i]) for i in group]
            T = max(lens)
            if T < 2:                          # nothing precedes the first token
                for i in group:
                    out[i] = ([None] * len(prompts[i]), [None] * len(prompts[i]))
                continue
            x = torch.zeros(len(group), T, dtype=torch.long)
            for b, i in enumerate(group):
                x[b, : lens[b]] = torch.tensor(prompts[i])
            x = x.to(model.device)
            with self.engine._autocast():
                h = model.hidden(x[:, :-1])                                        # (B, T-1, D)
            valid = torch.arange(T - 1, device=x.device) < (torch.tensor(lens, device=x.device) - 1).unsqueeze(1)
            hv, targets = h[valid], x[:, 1:][valid]                                # (N, D), (N,) in prompt order
            token_lp, top_v, top_i = [], [], []
            for k in range(0, hv.shape[0], head_rows):
                with self.engine._autocast():
                    logits = model.logits(hv[k: k + head_rows]).float()
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                token_lp.append((logits.gather(1, targets[k: k + head_rows].unsqueeze(1)) - lse).squeeze(1))
                if top:
                    v, idx = logits.topk(top, dim=-1)
                    top_v.append(v - lse)
                    top_i.append(idx)
            token_lp = torch.cat(token_lp).tolist()
            if top:
                top_v, top_i = torch.cat(top_v).tolist(), torch.cat(top_i).tolist()
            k = 0
            for b, i in enumerate(group):
                n = lens[b] - 1
                tops = [None] + ([dict(zip(top_i[j], top_v[j])) for j in range(k, k + n)] if top else [])
                out[i] = ([None] + token_lp[k: k + n], tops)
                k += n
        return out

    def check_stop_strings(self, s: Sequence) -> bool:
        """Finish `s` if its text now contains a stop string (the text is cut there by to_output)."""
        if s.params.stop and not s.finish_reason and self.tokenizer is not None:
            window = 8 + 4 * max(len(st) for st in s.params.stop)     # a token is >= 1 character
            tail = self.decode(s.out_ids[-window:], s.params.skip_special_tokens)
            if any(st in tail for st in s.params.stop):
                s.stop_text = True
                self.engine.finish(s, "stop")
                return True
        return False

    def to_output(self, s: Sequence) -> CompletionOutput:
        text = self.decode(s.out_ids, s.params.skip_special_tokens)
        if s.params.stop:
            cut = [text.find(st) for st in s.params.stop if st in text]
            if cut:
                text = text[: min(cut)]
        want = s.params.logprobs is not None
        return CompletionOutput(s.index, text, list(s.out_ids), sum(s.logprobs) if want else None,
                                list(s.logprobs) if want else None, s.finish_reason,
                                list(s.top_logprobs) if s.params.logprobs else None)
