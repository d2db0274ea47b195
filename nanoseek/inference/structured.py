"""Structured output: sampling constrained to a grammar (a JSON Schema, any JSON object, a Lark grammar).

    SamplingParams(grammar=json_schema_grammar(schema))      # or json_object_grammar(), lark_grammar(text)

The grammar engine is llguidance (the one vLLM, SGLang and llama.cpp use), chosen by measurement
(benchmarks/structured_backends.py on nanoseek's tokenizers, results in benchmarks/results/):
it compiles a JSON Schema in under 1 ms and computes a next-token mask in 0.01-0.04 ms at 282 and 32k
tokens, and it parses full context-free grammars. outlines-core turns a schema into a regex and indexes
the whole vocabulary up front: 7.7 s for "any JSON object" (a depth-limited regex), per grammar.
xgrammar's wheel requires triton, a GPU compiler a CPU install should not pull.

How it fits the engine (engine.py): `SamplingParams.grammar` holds llguidance's grammar text; the engine
gives every sampled sequence its own matcher at prefill. Before each sampling step, the rows with a
matcher fill one (B, ceil(V/32)) int32 bitmask (in parallel, in Rust), which masks their logits to
the tokens the grammar allows next; the sampled token then advances the matcher. EOS is allowed
exactly when the grammar is complete, so a constrained sequence stops with a whole document (or
runs out of max_tokens, as on any server). Log-probs are those of the masked distribution.

JSON is generated compact with standard separators (", " and ": ", no other whitespace): a model
cannot wander into unbounded whitespace, and json.loads reads it as is.
"""
from __future__ import annotations

import json

import torch

from ..common import UserError

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llg():
    try:
        import llguidance
    except ImportError:
        raise UserError("structured output needs llguidance: pip install llguidance") from None
    return llguidance


def with_json_options(schema: dict) -> dict:
    """A schema whose documents llguidance writes compact (JSON_OPTIONS), whatever its own x-guidance."""
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**(own if isinstance(own, dict) else {}), **JSON_OPTIONS}}


def after_reasoning(start: str, rules: list[str], after_token: int | None) -> str:
    """llguidance grammar text from a Lark `start` right-hand side and its rules. With `after_token` (an R1
    model's `</think>` id, when the prompt opened `<think>`): free reasoning text first, then that token
    and an optional newline. The reasoning cannot contain the token itself: llguidance spells added
    tokens with bytes no text has."""
    if after_token is not None:
        start = f'REASONING <[{after_token}]> "\\n"? {start}'
        rules = [*rules, "REASONING: /(?s:.*)/"]
    return lark_grammar("\n".join([f"start: {start}", *rules]) + "\n")


def json_schema_grammar(schema: dict, after_token: int | None = None) -> str:
    """llguidance grammar text for documents valid under a JSON Schema (after the reasoning, with
    `after_token`: see after_reasoning)."""
    if after_token is None:
        return _llg().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    return after_reasoning("data", [f"data: %json {json.dumps(with_json_options(schema))}"], after_token)


def json_object_grammar(after_token: int | None = None) -> str:
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    return json_schema_grammar({"type": "object"}, after_token)


def lark_grammar(text: str) -> str:
    """A Lark grammar (llguidance's dialect: `%json {schema}` embeds a JSON Schema as a rule)."""
    return _llg().LLMatcher.grammar_from_lark(text)


def tokenizer_json(tokenizer) -> str:
    """The tokenizers-library JSON of a nanoseek `Tokenizer` or of an `HFChatTokenizer`."""
    inner = getattr(tokenizer, "_tok", None)
    if inner is None and getattr(tokenizer, "hf", None) is not None:
        inner = getattr(tokenizer.hf, "backend_tokenizer", None)
    if inner is None:
        raise UserError("structured output needs a fast (tokenizers-library) tokenizer")
    return inner.to_str()


class Grammars:
    """The model's tokenizer in llguidance's form, and matchers for grammars; one per engine."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: list[int]):
        llg = _llg()
        self.vocab_size = vocab_size
        self.tokenizer = llg.LLTokenizer(tokenizer_json(tokenizer), n_vocab=vocab_size, eos_token=sorted(eos_ids))
        self._executor = None

    def check(self, grammar: str) -> None:
        """Raise UserError naming what is wrong with a grammar (a keyword of the wrong type, an
        unsatisfiable range, a dangling $ref, ...). Warnings refuse it too: OpenAI refuses a schema it
        cannot honour rather than constrain the output to something the user did not ask for."""
        llg = _llg()
        if not isinstance(grammar, str):
            raise UserError(f"grammar must be llguidance grammar text (json_schema_grammar(...)), got "
                            f"{type(grammar).__name__}")
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error or messages:
            raise UserError("the grammar is invalid: " + "; ".join(messages))

    def matcher(self, grammar: str):
        m = _llg().LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise UserError(f"the grammar is invalid: {m.get_error()}")
        return m

    def mask_(self, logits: torch.Tensor, matchers: list) -> torch.Tensor:
        """Set to -inf, in place, the logits (B,V) of the tokens each row's matcher forbids next
        (rows whose matcher is None are left alone)."""
        from llguidance.torch import fill_next_token_bitmask_par
        rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        B, V = logits.shape
        bits = torch.full((B, (V + 31) // 32), -1, dtype=torch.int32)
        if self._executor is None:
            self._executor = _llg().LLExecutor()
        fill_next_token_bitmask_par(self._executor, rows, bits)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(B, -1)[:, :V].bool()     # bit t%32 of word t//32
        return logits.masked_fill_(~allowed.to(logits.device), float("-inf"))
