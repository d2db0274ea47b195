"""Sampling completions for RL, evaluation, rejection sampling and distillation.

A *sampler* turns prompt ids into groups of completions: `rollout(prompts, SamplingParams) ->
[[{"ids", "logprobs", "truncated"}, ...n...], ...]`.
  EngineSampler - nanoseek models on our engine (latent cache, continuous batching, shared prefill
                  for the n samples of a prompt). It holds the model itself, not a copy.
  HFSampler     - any transformers causal LM via model.generate (for users with their own models).

`evaluate` scores a sampler on held-out problems: pass@1 (greedy, or the mean over k samples as R1
reports with t=0.6 / top-p 0.95), cons@k (majority vote over extracted answers), mean length, and
the share of completions that reason (`<think>`), reflect ("wait", "check", "verify") or
backtrack (abandon an attempt and try another: the "... no." of a Countdown search trace).
"""
from __future__ import annotations

import re

import numpy as np
import torch

from ..common import UserError, parse_dtype
from ..inference.sampling import SamplingParams

REFLECTION = re.compile(r"\b(wait|check|verify|recheck)\b", re.IGNORECASE)
BACKTRACK = re.compile(r"\bno\.")


def prompt_ids(tok, question: str) -> list[int]:
    """The chat prompt for one question: BOS <｜User｜> question <｜Assistant｜>."""
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True))


def context_length(tok, questions, max_new_tokens: int, limit: int | None) -> int:
    """Engine context for these prompts: the longest chat prompt + max_new_tokens, refused with the
    numbers and the fix when it exceeds the model's max_position_embeddings (`limit`)."""
    longest = max((len(prompt_ids(tok, q)) for q in questions), default=1)
    need = longest + max_new_tokens
    if limit is not None and need > limit:
        raise UserError(f"the longest prompt has {longest} tokens; with --max-new-tokens {max_new_tokens} a sequence "
                        f"needs {need} positions, more than the model's max_position_embeddings={limit}: lower "
                        f"--max-new-tokens to {limit - longest} or shorten the prompts")
    return need


def load_for_sampling(model_dir, device, questions: list[str], max_new_tokens: int, seed: int = 0,
                      max_batch: int = 256, **engine_kw):
    """(sampler, model, tokenizer) for a model directory: nanoseek (DeepSeek-V3/V2) models on the engine,
    any other causal LM through transformers, each with its own tokenizer and chat template; the
    engine's context fits the longest of `questions` + max_new_tokens (checked against the model)."""
    import json
    from pathlib import Path

    from ..tokenizer import load_tokenizer
    path = Path(model_dir)
    if not (path / "config.json").exists():
        raise UserError(f"{model_dir}: not a model directory (no config.json)")
    try:
        tok = load_tokenizer(path)
    except ValueError as e:
        raise UserError(str(e)) from None
    config = json.loads((path / "config.json").read_text())
    max_len = context_length(tok, questions, max_new_tokens, config.get("max_position_embeddings"))
    if config.get("model_type", "") in ("deepseek_v3", "deepseek_v2"):
        from ..checkpoint.hf import from_pretrained
        model = from_pretrained(path, device=device)
        return EngineSampler(model, tok, max_batch=max_batch, max_len=max_len, seed=seed, **engine_kw), model, tok
    from transformers import AutoModelForCausalLM
    # fp32 master weights whatever the checkpoint's dtype (bf16 on the hub: RL-sized steps would round away);
    # compute runs under autocast
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return HFSampler(model, tok, device), model, tok


class EngineSampler:
    def __init__(self, model, tok, max_batch: int = 256, max_len: int = 512, seed: int = 0,
                 rollout_dtype: str | None = None, compile: bool | str = "auto", record_routing: bool = False):
        from ..inference.engine import Engine

        self.model, self.tok = model, tok
        rd = None if rollout_dtype in (None, "none", "auto") else parse_dtype(rollout_dtype)
        self.engine = Engine(model, max_batch=max_batch, max_len=max_len, seed=seed, autocast_dtype=rd,
                             stop_token_ids=list(getattr(tok, "stop_ids", [tok.eos_id])), compile=compile,
                             record_routing=record_routing)

    def rollout(self, prompts: list[list[int]], params: SamplingParams) -> list[list[dict]]:
        eng = self.engine
        rids = [eng.add_request(p, params, f"r{i}") for i, p in enumerate(prompts)]
        done: dict[str, list] = {r: [None] * params.n for r in rids}
        while eng.has_work():
            for s in eng.step():
                if s.finish_reason:
                    done[s.request_id][s.index] = {"ids": list(s.out_ids), "logprobs": list(s.logprobs),
                                                   "truncated": s.finish_reason == "length"}
                    if s.routing:       # experts of every input position: (n_moe, prompt + out - 1, K)
                        done[s.request_id][s.index]["routing"] = torch.cat(s.routing, dim=1).cpu()
        return [done[r] for r in rids]

    def reseed(self, seed: int) -> None:
        self.engine.gen.manual_seed(seed)

    def horizon(self, done: int, total: int, phase: str = "rollout") -> None:
        """This phase of the run (training rollouts, evaluations) is `done` of `total` units through: the
        engine compiles its decode step only if the units left are expected to repay it (DecodeRunner's
        compile policy)."""
        self.engine.runner.horizon = (done, total, phase)

    def clear_horizon(self) -> None:
        """Back to the policy for jobs of unknown length (after the run that set a horizon)."""
        self.engine.runner.horizon = None

    def sync_weights(self) -> None:
        """The trainer stepped the model: rebuild the engine's derived decode weights."""
        self.engine.sync_weights()


class HFSampler:
    """transformers causal LMs: batched `generate` over every prompt and sample of a rollout.

    The sampling distribution must be the one the trainer scores (softmax(logits / T), top-p only):
    `generate` would otherwise add transformers' default top_k=50 and whatever the model's
    `generation_config.json` sets (penalties, no-repeat n-grams, min length), so every knob is given
    explicitly in a fresh GenerationConfig."""

    def __init__(self, model, tok, device):
        self.model, self.tok, self.device = model, tok, device

    def stop_ids(self) -> list[int]:
        """The tokenizer's EOS and end-of-turn token, and the EOS list of the model's generation config."""
        ids = list(getattr(self.tok, "stop_ids", [self.tok.eos_id]))
        extra = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for t in (extra if isinstance(extra, list) else [extra] if extra is not None else []):
            if t not in ids:
                ids.append(t)
        return ids

    def generation_config(self, params: SamplingParams):
        from transformers import GenerationConfig
        eos = self.stop_ids()
        sample = params.temperature > 0
        return GenerationConfig(do_sample=sample, temperature=params.temperature if sample else None,
                                top_p=params.top_p if sample else None, top_k=0 if sample else None,
                                repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                                max_new_tokens=params.max_tokens, pad_token_id=self.tok.pad_id, eos_token_id=eos,
                                num_beams=1)

    def horizon(self, done: int, total: int, phase: str = "rollout") -> None:
        """`generate` compiles nothing: there is no compile decision to inform."""

    def clear_horizon(self) -> None:
        pass

    def rollout(self, prompts, params: SamplingParams, max_rows: int = 256):
        """All prompts x n samples in as few `generate` calls as fit `max_rows`, prompts left-padded
        (the attention mask hides the padding; transformers derives positions from it)."""
        stops, pad = set(self.stop_ids()), self.tok.pad_id
        gc = self.generation_config(params)
        rows = [p for p in prompts for _ in range(params.n)]
        texts = []
        for start in range(0, len(rows), max_rows):
            chunk = rows[start: start + max_rows]
            width = max(len(p) for p in chunk)
            x = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=self.device)
            attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)
            with torch.no_grad():
                g = self.model.generate(x, attention_mask=attn, generation_config=gc)
            texts += g[:, width:].tolist()
        out = []
        for i in range(len(prompts)):
            group = []
            for ids in texts[i * params.n: (i + 1) * params.n]:
                end = next((j for j, t in enumerate(ids) if t in stops), None)
                if end is not None:      # finished rows are padded after their stop token; unfinished have none
                    ids = ids[: end + 1]
                group.append({"ids": ids, "logprobs": None, "truncated": end is None})
            out.append(group)
        return out

    def reseed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def sync_weights(self) -> None:
        """generate() reads the model's parameters directly: nothing to rebuild."""


def reflection_stats(reflect: list[bool], correct: list[bool]) -> dict:
    """How often completions reflect, and whether reflecting pays: `self_correction_rate` is the share
    of all completions that reflect *and* end right; the accuracies are conditioned on reflecting or
    not (None when no completion falls in that class)."""
    refl = [c for r, c in zip(reflect, correct) if r]
    plain = [c for r, c in zip(reflect, correct) if not r]
    return {"reflection_rate": float(np.mean(reflect)) if reflect else 0.0,
            "self_correction_rate": float(np.mean([r and c for r, c in zip(reflect, correct)])) if reflect else 0.0,
            "accuracy_reflecting": float(np.mean(refl)) if refl else None,
            "accuracy_not_reflecting": float(np.mean(plain)) if plain else None}


@torch.no_grad()
def evaluate(sampler, tok, problems, max_new_tokens: int, temperature: float = 0.0, samples: int = 1,
             top_p: float = 1.0, seed: int = 0, return_texts: bool = False) -> dict:
    from ..data.tasks import extract_answer, get_checker

    prompts = [prompt_ids(tok, p.question) for p in problems]
    sp = SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
    sampler.reseed(seed)
    groups = sampler.rollout(prompts, sp)
    correct, cons, lengths, think, reflect, backtrack, texts_all, ok_all = [], [], [], [], [], [], [], []
    for prob, group in zip(problems, groups):
        check = get_checker(prob.task)
        texts = [tok.decode(c["ids"]) for c in group]
        answers = [extract_answer(t) for t in texts]
        ok = [bool(check(a, prob)) for a in answers]
        ok_all += ok
        correct.append(float(np.mean(ok)))
        votes = [a for a in answers if a is not None]
        majority = max(set(votes), key=votes.count) if votes else None
        cons.append(float(bool(check(majority, prob))) if majority is not None else 0.0)
        lengths += [len(c["ids"]) for c in group]
        think += ["<think>" in t for t in texts]
        reflect += [bool(REFLECTION.search(t)) for t in texts]
        backtrack += [bool(BACKTRACK.search(t)) for t in texts]
        texts_all.append(texts)
    res = {"accuracy": float(np.mean(correct)), f"cons@{samples}": float(np.mean(cons)),
           "pass@k": float(np.mean([c > 0 for c in correct])),
           "mean_length": float(np.mean(lengths)), "think_rate": float(np.mean(think)),
           "backtrack_rate": float(np.mean(backtrack)),
           "n": len(problems), "samples": samples, "temperature": temperature, **reflection_stats(reflect, ok_all)}
    if return_texts:
        res["texts"] = texts_all
    return res
