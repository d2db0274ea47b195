"""Structured output in the engine: grammar masks (vs a token-by-token reference), batched rows agree
with rows run alone, and every sampled document of a tiny random model parses and validates."""
import json
from typing import Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from nanoseek.common import UserError
from nanoseek.inference import LLM, SamplingParams
from nanoseek.inference.structured import json_object_grammar, json_schema_grammar, lark_grammar


class Person(BaseModel):
    """Bounded fields and no extra keys: every path through the grammar ends within a few dozen tokens."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)
    active: bool


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), max_len=160, max_batch=16, compile=False)


def test_mask_matches_token_by_token_reference(llm):
    """The batched bitmask unpacking allows exactly the tokens the matcher accepts one at a time."""
    g = llm.engine.grammars
    grammar = json_schema_grammar(Person.model_json_schema())
    doc = llm.tokenizer.encode('{"name": "Ada", "age": 36, "role": "admin", "tags": ["a"], "active": true}')
    m = g.matcher(grammar)
    V = llm.model.cfg.vocab_size
    for step, tok in enumerate(doc[:12] + [None]):
        logits = torch.zeros(2, V)
        g.mask_(logits, [None, m])
        assert (logits[0] == 0).all()                       # an unconstrained row is untouched
        allowed = set(torch.nonzero(logits[1] == 0).flatten().tolist())
        want = {t for t in range(V) if m.validate_tokens([t]) == 1}
        assert allowed == want and allowed, f"step {step}"
        if tok is not None:
            assert tok in allowed
            m.consume_token(tok)


def test_sampled_documents_validate_and_batch_agrees(llm):
    grammar = json_schema_grammar(Person.model_json_schema())
    prompt = llm.tokenizer.encode("<｜User｜>Who?<｜Assistant｜>")
    constrained = SamplingParams(n=4, temperature=1.0, max_tokens=120, seed=7, grammar=grammar)
    free = SamplingParams(temperature=1.0, max_tokens=20, seed=3)
    obj = SamplingParams(temperature=0, max_tokens=60, grammar=json_object_grammar())
    together = llm.generate([{"prompt_token_ids": prompt}] * 3, [constrained, free, obj])
    alone = [llm.generate([{"prompt_token_ids": prompt}], p)[0] for p in (constrained, free, obj)]
    for a, b in zip(together, alone):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    for o in together[0].outputs:
        assert o.finish_reason == "stop", o.text
        Person.model_validate_json(o.text)
    assert len({o.text for o in together[0].outputs}) > 1          # samples differ: T=1 is honoured
    if together[2].outputs[0].finish_reason == "stop":
        assert isinstance(json.loads(together[2].outputs[0].text), dict)
    else:                                                          # a random model may nest past max_tokens
        assert together[2].outputs[0].text.startswith("{")


def test_lark_grammar_and_bad_grammar(llm):
    out = llm.generate(["x"], SamplingParams(temperature=1.0, max_tokens=10, seed=0,
                                             grammar=lark_grammar('start: ("yes" | "no") "!"')))
    assert out[0].outputs[0].text in ("yes!", "no!")
    with pytest.raises(UserError, match="grammar"):
        llm.generate(["x"], SamplingParams(grammar=json_schema_grammar({"type": "nonsense"})))


def test_a_tiny_temperature_is_greedy_and_keeps_to_the_grammar(llm):
    """temperature 1e-38 (schemathesis sends such floats): logits / T overflowed, every allowed logit of a row could
    become -inf and argmax picked token 0 against the grammar. Below 1e-5 sampling is greedy (vLLM's rule)."""
    grammar = json_object_grammar()
    tiny = llm.generate(["x"], SamplingParams(temperature=1e-38, max_tokens=12, grammar=grammar, logprobs=2))
    greedy = llm.generate(["x"], SamplingParams(temperature=0, max_tokens=12, grammar=grammar, logprobs=2))
    assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    assert tiny[0].outputs[0].text.startswith("{")
    assert tiny[0].outputs[0].top_logprobs == greedy[0].outputs[0].top_logprobs
