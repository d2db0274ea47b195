"""The OpenAI-compatible server, driven by the official `openai` client and raw httpx on loopback.

A tiny random model served from a background uvicorn thread (port chosen by the OS); reference
outputs come from a second `LLM` on the same weights, run one prompt at a time.
"""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from nanoseek.inference import LLM, SamplingParams
from nanoseek.inference.server import ReasoningSplitter, TextStream, build_app, listen, serve_in_thread

KEY = "sk-test"
MAX_LEN = 96


@pytest.fixture(scope="module")
def ref(model_dir):
    """The same weights in a second LLM, for reference outputs (the server's engine is its own)."""
    return LLM(str(model_dir), max_len=MAX_LEN, max_batch=8)


running = serve_in_thread          # the server on a background thread, yielding its URL


@pytest.fixture(scope="module")
def served(model_dir):
    llm = LLM(str(model_dir), max_len=MAX_LEN, max_batch=16)
    app = build_app(llm, "tiny", api_key=KEY)
    with running(app) as url:
        yield url, app


@pytest.fixture
def url(served):
    return served[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)


AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]


def chat_ids(ref, messages, thinking=False):
    return ref.tokenizer.encode(ref.tokenizer.apply_chat_template(messages, thinking=thinking))


def greedy(ref, prompt_ids, max_tokens):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0)
    out = ref.generate([{"prompt_token_ids": prompt_ids}], params)
    return out[0].outputs[0]


# ------------------------------------------------------------------------------------------------
def test_models_and_health(client, url):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].object == "model"
    assert client.models.retrieve("tiny").id == "tiny"
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_chat_matches_reference(client, ref):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0)
    want = greedy(ref, chat_ids(ref, MSGS), 12)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    assert isinstance(r.created, int)
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant" and c.finish_reason == want.finish_reason
    splitter = ReasoningSplitter()
    reasoning, content = splitter.split(want.text)
    assert c.message.content == content
    assert getattr(c.message, "reasoning_content", None) == (reasoning if splitter.saw_reasoning else None)
    assert r.usage.prompt_tokens == len(chat_ids(ref, MSGS))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_content_parts_and_thinking(client, ref):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}]
    r = client.chat.completions.create(model="tiny", messages=parts, max_tokens=4, temperature=0)
    assert r.usage.prompt_tokens == len(chat_ids(ref, [{"role": "user", "content": "Hello\nworld"}]))
    # thinking: the R1 template opens <think>, so everything generated (no </think> here) is reasoning
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0,
                                       extra_body={"thinking": True})
    ids = chat_ids(ref, MSGS, thinking=True)
    want = greedy(ref, ids, 6)
    reasoning, content = ReasoningSplitter(in_reasoning=True).split(want.text)
    assert r.usage.prompt_tokens == len(ids)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == (reasoning, content)
    r2 = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0,
                                        extra_body={"chat_template_kwargs": {"thinking": True}})
    assert r2.choices[0].message.reasoning_content == r.choices[0].message.reasoning_content


def test_chat_stream_reassembles(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    reasoning = "".join(getattr(ch.choices[0].delta, "reasoning_content", None) or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert reasoning == (getattr(whole.choices[0].message, "reasoning_content", None) or "")
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == {**whole.usage.model_dump()}
    assert all(ch.usage is None for ch in chunks[:-1])


def test_raw_sse_shape(url):
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    for ch in chunks:
        assert set(ch) == {"id", "object", "created", "model", "choices"} and ch["object"] == "chat.completion.chunk"
        assert set(ch["choices"][0]) == {"index", "delta", "logprobs", "finish_reason"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def test_completions_plain_and_stream(client, ref):
    r = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0)
    ids = ref.encode_prompt("The quick brown")[1]
    want = greedy(ref, ids, 10)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 10)
    chunks = list(client.completions.create(model="tiny", prompt="The quick brown", max_tokens=10, temperature=0,
                                            stream=True))
    assert all(ch.object == "text_completion" for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "length"
    # several prompts (text and token ids): choices are numbered prompt-major
    r = client.completions.create(model="tiny", prompt=["Hello", "fox"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == greedy(ref, ref.encode_prompt("Hello")[1], 3).text
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text


def test_n_samples_and_seed(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=8, temperature=1.0, n=3, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1          # the samples differ from each other
    assert a.usage.completion_tokens == 24
    chunks = list(client.chat.completions.create(**kw, stream=True))
    for i, c in enumerate(a.choices):
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices[0].index == i) \
            == c.message.content


def test_concurrent_requests_equal_sequential(served, client, ref):
    engine = served[1].state.worker.llm.engine
    prompts = ["Hello", "The quick brown fox", "12+34=", "café", "how are you today?", "naïve"]
    want = [greedy(ref, chat_ids(ref, [{"role": "user", "content": p}]), 10).text for p in prompts]

    def ask(p):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                           max_tokens=10, temperature=0)
        m = r.choices[0].message
        return (getattr(m, "reasoning_content", None) or "") + "|" + m.content

    steps = engine.stats["steps"]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, prompts))
    assert engine.stats["steps"] - steps < 10 * len(prompts)      # batched: fewer steps than one by one
    split = [ReasoningSplitter().split(t) for t in want]
    assert got == [r + "|" + c for r, c in split]


def test_logprobs(client, ref):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3)
    want = greedy(ref, chat_ids(ref, MSGS), 5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    assert [e.logprob for e in content] == pytest.approx(want.logprobs, abs=1e-4)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)
        assert isinstance(e.bytes, list)
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices[0].logprobs is None


# ------------------------------------------------------------------------------------------------
def test_reasoning_splitter_streams_split_tags():
    text = "  <think>\nI should add 2 and 2.\n</think>\n\nThe answer is 4. <think> stays"
    whole = ReasoningSplitter().split(text)
    assert whole == ("I should add 2 and 2.\n", "The answer is 4. <think> stays")
    for cuts in ([3, 5, 9, 30, 33, 36, 40], list(range(1, len(text))), [4, 8, 31, 37]):
        s = ReasoningSplitter()
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        outs = [s.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        assert ("".join(r for r, _ in outs), "".join(c for _, c in outs)) == whole
        assert all("<" not in r and "think" not in r for r, _ in outs)
    # the R1 prompt already opened <think>: reasoning until </think>; no tags at all: all content
    assert ReasoningSplitter(in_reasoning=True).split("step 1\n</think>answer") == ("step 1\n", "answer")
    assert ReasoningSplitter(in_reasoning=True).split("cut off mid-thought") == ("cut off mid-thought", "")
    s = ReasoningSplitter()
    assert s.split("plain answer") == ("", "plain answer") and not s.saw_reasoning
    s = ReasoningSplitter(in_reasoning=True)
    assert [s.feed(p) for p in ["a</th", "ink", ">b"]] == [("a", ""), ("", ""), ("", "b")]


def test_text_stream_utf8_and_stop(ref):
    tok = ref.tokenizer
    text = "Héllo 世界, naïve café 🙂 done"
    ids = tok.encode(text)
    stream = TextStream(tok.decode)
    deltas = [stream.update(ids[: k + 1]) for k in range(len(ids))]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish(tok.decode(ids)) == text
    stream = TextStream(tok.decode, stop=["café", "xyz"])
    deltas = [stream.update(ids[: k + 1]) for k in range(len(ids))]
    assert "".join(deltas) == "Héllo 世界, naïve "            # never a piece of the stop string


def test_stop_strings(client, ref):
    full = greedy(ref, chat_ids(ref, MSGS), 12).text
    starts = [i for i in range(1, len(full) - 1) if not set(full[i:i + 2]) & set("\ufffd<>")]
    if not starts:
        pytest.skip("the random model's text has no usable stop string")
    stop = full[starts[0]:starts[0] + 2]
    want = full[: full.find(stop)]
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == want
    assert r.usage.completion_tokens < 12
    chunks = list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=12, temperature=0,
                                                 stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------
LONG = "hello " * 200
BAD = [  # (path, body, param)
    ("/v1/chat/completions", "{not json", None),
    ("/v1/chat/completions", [1, 2], None),
    ("/v1/chat/completions", {"model": "tiny"}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": -1}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": "10"}, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": -1}, "temperature"),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": 2.5}, "temperature"),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": True}, "temperature"),
    ("/v1/chat/completions", {"messages": MSGS, "top_p": 0}, "top_p"),
    ("/v1/chat/completions", {"messages": MSGS, "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": MSGS, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": MSGS, "n": 1000}, "n"),
    ("/v1/chat/completions", {"messages": MSGS, "stop": ["ok", 3]}, "stop"),
    ("/v1/chat/completions", {"messages": MSGS, "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function"}]}, "tools[0]"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools[0]"),
    ("/v1/chat/completions", {"messages": MSGS, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
     "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": "json"}, "response_format"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
    ("/v1/chat/completions", {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": "x"}}}}}},
     "response_format.json_schema.schema"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("/v1/completions", {"prompt": LONG}, "prompt"),
    ("/v1/completions", {"prompt": [0, 1, 10**6]}, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/chat/completions", {"messages": MSGS, "repetition_penalty": 0}, "repetition_penalty"),
    ("/v1/chat/completions", {"messages": MSGS, "min_p": 1.5}, "min_p"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSGS, "repetition_penalty": 1e-40}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSGS, "temperature": 10**400}, "temperature"),
    ("/v1/chat/completions", "[" * 200000, None),
    # these were 500s: a non-string role, and lone UTF-16 surrogates (valid JSON, not valid text)
    ("/v1/chat/completions", {"messages": [{"role": ["user"], "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content"),
    ("/v1/completions", {"prompt": "a\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "\udfff"]}, "prompt"),
]


@pytest.mark.parametrize("path,body,param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_request_is_400(url, path, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + path, content=content, headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]


def test_errors_through_openai_client_and_server_survives(client, url):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "bot", "content": "x"}])
    assert e.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": LONG}])
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MSGS)
    assert httpx.get(url + "/v1/nope", headers=AUTH).json()["error"]["message"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).choices[0].message


def test_api_key(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(url + "/v1/chat/completions", json={"messages": MSGS}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    for scheme in ("bearer", "BEARER", "Bearer "):          # the scheme is case-insensitive (RFC 9110)
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": f"Basic {KEY}"}).status_code == 401


def test_405_says_which_methods_are_allowed(url):
    r = httpx.get(url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "") and r.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200       # health needs no key


def test_fastapi_validation_errors_are_400(served):
    url, app = served

    @app.get("/v1/probe")
    async def probe(k: int):              # a typed parameter: FastAPI validates it (422 by default)
        return {"k": k}

    r = httpx.get(url + "/v1/probe", params={"k": "abc"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "k"


def test_client_disconnect_aborts(served, monkeypatch):
    url, app = served
    worker = app.state.worker
    real_step = worker.llm.engine.step

    def slow_step():                      # slow enough that the request cannot finish before we hang up
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(worker.llm.engine, "step", slow_step)
    before = worker.stats["aborted"]
    body = {"messages": MSGS, "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        next(r.iter_lines())                                      # the role chunk: the request is live
    deadline = time.monotonic() + 20
    while worker.stats["aborted"] == before or worker.jobs:
        assert time.monotonic() < deadline, "the streamed request was not aborted"
        time.sleep(0.02)
    with pytest.raises(httpx.ReadTimeout):                        # a non-streamed request, given up on
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, headers=AUTH, timeout=0.5)
    while worker.stats["aborted"] == before + 1 or worker.jobs:
        assert time.monotonic() < deadline, "the non-streamed request was not aborted"
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------
class Boom(BaseException):
    """Not an Exception: escapes the worker's per-batch handler and ends the engine thread."""


def test_engine_failures(ref, model_dir):
    llm = LLM(ref.model, tokenizer=ref.tokenizer, max_len=MAX_LEN, max_batch=4)
    real_step = llm.engine.step
    failure = {"kind": RuntimeError}

    def step():
        if failure["kind"] is not None:
            kind, failure["kind"] = failure["kind"], None
            raise kind("injected")
        return real_step()

    llm.engine.step = step
    body = {"messages": MSGS, "max_tokens": 3}
    with running(build_app(llm, "tiny", None)) as url:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)      # the failing batch
        assert r.status_code == 500 and "injected" in r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "server_error"
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        failure["kind"] = Boom                                                    # now kill the thread
        r = httpx.post(url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30)
        assert r.status_code == 200 and "engine thread stopped" in r.text and r.text.endswith("data: [DONE]\n\n")
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and "engine thread stopped" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503


def test_serve_subprocess(model_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--port", "0",
                             "--model-name", "tiny", "--max-len", str(MAX_LEN), "--log-level", "warning",
                             "--device", "cpu", "--no-compile"],      # (compiling at start-up: test_runner)
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()                  # "nanoseek serve: model 'tiny' (...) at http://...:PORT/v1"
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        base = line.split(" at ")[-1].strip()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base.removesuffix("/v1") + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=3)
        assert r.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(15) in (0, 130), proc.stderr.read()   # 130: uvicorn re-raises the Ctrl-C
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise


def test_requests_far_over_a_limit_are_refused_fast_and_health_stays_up(url):
    """Each limit, 100x over, answers in < 1 s with its error, while /health keeps answering in < 100 ms."""
    big_chars = MAX_LEN * 100 * 8                                # ~100x the context, in characters
    cases = [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "7" * big_chars}]}, 400, "messages"),
        ("/v1/completions", {"prompt": "7" * big_chars}, 400, "prompt"),
        ("/v1/completions", {"prompt": "7" * (9 << 20)}, 413, None),                # body over the 8 MB default
        ("/v1/completions", {"prompt": ["1+1="] * (2048 * 100)}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["1+1="] * 2049}, 400, "prompt"),
        ("/v1/completions", {"prompt": ["1+1="] * 64, "n": 16, "max_tokens": 1 << 20}, 400, "max_tokens"),
    ]
    health = []
    stop = threading.Event()

    def poll():
        with httpx.Client(timeout=5) as h:
            while not stop.is_set():
                t = time.perf_counter()
                assert h.get(url + "/health").status_code == 200
                health.append(time.perf_counter() - t)
                time.sleep(0.02)
    bodies = [json.dumps(body) for _, body, _, _ in cases]      # serialised up front: the test's own GIL time
    th = threading.Thread(target=poll)                           # must not count as the server's
    th.start()
    try:
        for (path, body, status, param), content in zip(cases, bodies):
            t = time.perf_counter()
            r = httpx.post(url + path, content=content, headers={**AUTH, "Content-Type": "application/json"},
                           timeout=30)
            took = time.perf_counter() - t
            assert r.status_code == status and r.json()["error"]["param"] == param, (path, r.status_code, r.text[:200])
            assert took < 1.0, (path, took)
    finally:
        stop.set()
        th.join()
    assert health and max(health) < 0.1, max(health)


def test_echo_returns_the_prompts_logprobs_as_the_model_computes_them(url, ref):
    """lm-eval's loglikelihood request: prompt token ids, echo, logprobs, max_tokens 0 -> the prompt's tokens
    with their log-probs (first null) equal to a direct forward of the model."""
    import torch
    ids = [[ref.model.cfg.bos_token_id, 5, 9, 11, 42], [ref.model.cfg.bos_token_id, 7, 8]]
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": ids, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}).json()
    assert [c["finish_reason"] for c in r["choices"]] == ["length", "length"]
    for choice, p in zip(r["choices"], ids):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(p) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        with torch.no_grad():
            want = torch.log_softmax(ref.model.logits(ref.model.hidden(torch.tensor([p[:-1]]))).float(), -1)[0]
        expect = want.gather(1, torch.tensor(p[1:]).unsqueeze(1)).squeeze(1).tolist()
        assert lp["token_logprobs"][1:] == pytest.approx(expect, abs=1e-4)
        assert all(len(t) <= 2 for t in lp["top_logprobs"][1:])
    # echo + generation: the prompt, then the generated tokens, offsets continuing
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": ids[0], "echo": True, "logprobs": 0, "max_tokens": 3, "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids[0]) + 3 and lp["token_logprobs"][0] is None
    assert lp["text_offset"] == sorted(lp["text_offset"]) and r["choices"][0]["text"].startswith(
        "".join(lp["tokens"][:len(ids[0])]))
    bad = httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": "hi", "max_tokens": 0}).json()
    assert bad["error"]["param"] == "max_tokens"
    one = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,         # a 1-token prompt: no 500
                     json={"prompt": ids[0][:1], "echo": True, "logprobs": 1, "max_tokens": 0}).json()
    assert one["choices"][0]["logprobs"]["token_logprobs"] == [None]
    plain = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,        # echo without log-probs
                       json={"prompt": ids[0], "echo": True, "max_tokens": 0}).json()
    assert plain["choices"][0]["logprobs"] is None and plain["choices"][0]["text"]


def test_prometheus_metrics(url, client):
    client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    httpx.post(url + "/v1/completions", headers=AUTH, json={"prompt": {"a": 1}})           # a 400
    text = httpx.get(url + "/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['nanoseek_requests_total{endpoint="chat",status="200"}'] >= 1
    assert values['nanoseek_requests_total{endpoint="completions",status="400"}'] >= 1
    assert values['nanoseek_tokens_total{kind="completion"}'] >= 2
    assert values['nanoseek_response_start_seconds_bucket{endpoint="chat",le="+Inf"}'] >= 1
    assert "nanoseek_running_requests" in values and "# TYPE nanoseek_response_start_seconds histogram" in text
    before = values.get('nanoseek_requests_total{endpoint="completions",status="200"}', 0)
    for part in client.completions.create(model="tiny", prompt="1+1=", max_tokens=3, stream=True):
        pass                                          # a stream is counted once, when its first chunk goes out
    text = httpx.get(url + "/metrics").text
    after = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line and not line.startswith("#")}
    assert after['nanoseek_requests_total{endpoint="completions",status="200"}'] == before + 1


def test_penalties_and_logit_bias_through_the_api(url):
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"prompt": [1, 5, 9], "max_tokens": 4, "temperature": 0, "logit_bias": {"9": 100},
                         "logprobs": 0}).json()
    tokens = r["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 4 and len(set(tokens)) == 1          # token 9, every time
    r2 = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                    json={"prompt": [1, 5, 9], "max_tokens": 4, "temperature": 0, "logit_bias": {"9": 100},
                          "frequency_penalty": 2.0, "presence_penalty": 2.0, "repetition_penalty": 1.2}).json()
    assert r2["choices"][0]["finish_reason"] in ("length", "stop")
    ids = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                     json={"prompt": [1, 5, 9], "max_tokens": 4, "temperature": 0, "logit_bias": {"9": 100},
                           "logprobs": 1}).json()["choices"][0]["logprobs"]["top_logprobs"]
    assert all(len(t) == 1 for t in ids)                 # the biased token dominates every step


# ------------------------------------------------------------------------------------------------
# the chat page

def test_chat_page_is_served_and_self_contained(url):
    r = httpx.get(url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in r.text and "reasoning_content" in r.text
    assert "http://" not in r.text and "https://" not in r.text and "<script src" not in r.text    # no CDN


def _browser():
    """A headless Chromium through Selenium, or a skip naming what is missing (`make browser` installs it)."""
    import shutil
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make browser)")
    chrome = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("no Chromium/chromedriver on this machine (make browser: apt-get install chromium "
                    "chromium-driver)")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_chat_page_in_a_real_browser(url):
    """Type two messages in the page: each streams an answer from the server, and the second request carries
    the first turn (the page keeps the conversation)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    b = _browser()
    try:
        b.get(url + "/")
        WebDriverWait(b, 20).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
        b.find_element(By.ID, "key").send_keys(KEY)
        b.find_element(By.ID, "max_tokens").clear()
        b.find_element(By.ID, "max_tokens").send_keys("8")
        for turn, text in enumerate(["1+1=?", "and 2+2=?"], start=1):
            b.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
            WebDriverWait(b, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
                                       == turn)
        assert not b.find_elements(By.CSS_SELECTOR, ".error"), b.find_element(By.CSS_SELECTOR, ".error").text
        assert [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.user")] == ["1+1=?", "and 2+2=?"]
        turns = b.execute_script("return turns")
        assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
        assert turns[1]["content"] == b.execute_script("return document.querySelector('.msg.assistant .body').textContent")
        b.find_element(By.ID, "key").clear()                    # a wrong key: the error is shown, the turn dropped
        b.find_element(By.ID, "key").send_keys("wrong")
        b.find_element(By.ID, "input").send_keys("3+3=?", Keys.ENTER)
        WebDriverWait(b, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".error"))
        assert len(b.execute_script("return turns")) == 4
    finally:
        b.quit()


# ------------------------------------------------------------------------------------------------
# structured output and tools: a longer context (tool definitions and the call markup take hundreds of
# tokens of this 300-token vocabulary: the markup characters are 3 UTF-8 bytes each)

class Answer(BaseModel):
    """Bounded fields and no extra keys, so every path through its grammar ends well within max_tokens."""
    model_config = ConfigDict(extra="forbid")
    value: int = Field(ge=0, le=999)
    unit: Literal["m", "s", "kg"]
    sure: bool


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {},
                                                                        "additionalProperties": False}}}


@pytest.fixture(scope="module")
def served_long(model_dir):
    llm = LLM(str(model_dir), max_len=1024, max_batch=8)
    with running(build_app(llm, "tiny")) as url:
        yield url


def test_response_format_json_schema_and_object(served_long):
    client = openai.OpenAI(base_url=served_long + "/v1", api_key="x", max_retries=0, timeout=120)
    schema = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": Answer.model_json_schema(),
                                                      "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format=schema, n=4, temperature=1.0,
                                       seed=1, max_tokens=200)
    assert all(c.finish_reason == "stop" for c in r.choices)
    parsed = [Answer.model_validate_json(c.message.content) for c in r.choices]
    assert len({p.model_dump_json() for p in parsed}) > 1         # sampled, not one canned answer
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format={"type": "json_object"},
                                       temperature=0, max_tokens=200)
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))
    # with R1's <think>: free reasoning, then </think> and the document
    r = client.chat.completions.create(model="tiny", messages=MSGS, response_format=schema, temperature=1.0,
                                       seed=2, max_tokens=300, extra_body={"thinking": True, "logit_bias": {"5": 4}})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.message.reasoning_content is not None
    Answer.model_validate_json(c.message.content)
    # a schema's own "x-guidance" of the wrong type is the user's mistake or ignored, never a 500
    odd = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "x-guidance": "x"}}}
    for thinking in (False, True):
        r = httpx.post(served_long + "/v1/chat/completions", json={"messages": MSGS, "response_format": odd,
                                                                   "thinking": thinking, "max_tokens": 20})
        assert r.status_code in (200, 400), r.text


def test_langchain_with_structured_output(served_long):
    from langchain_openai import ChatOpenAI
    chat = ChatOpenAI(base_url=served_long + "/v1", api_key="x", model="tiny", temperature=1.0, max_tokens=200,
                      max_retries=0)
    structured = chat.with_structured_output(Answer)          # method="json_schema", strict
    outs = [structured.invoke(f"Question {i}?") for i in range(6)]
    assert all(isinstance(o, Answer) for o in outs)


def test_tool_calls_forced_named_auto_and_streamed(served_long):
    client = openai.OpenAI(base_url=served_long + "/v1", api_key="x", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, NOW], tool_choice="required",
                                       parallel_tool_calls=False, n=3, temperature=1.0, seed=4, max_tokens=200)
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            assert args["city"] in ("Paris", "Rome") and 1 <= args["days"] <= 7 and set(args) == {"city", "days"}
        else:
            assert call.function.name == "now" and args == {}
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, NOW], tool_choice=named,
                                       temperature=1.0, seed=5, max_tokens=200)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    # the conversation goes on with the call and its result in the prompt (DeepSeek's markup)
    follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "18C"}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=5, temperature=0)
    assert r2.choices[0].message.role == "assistant"
    # streamed: the same call arrives as one tool_calls delta, then finish_reason tool_calls
    stream = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER, NOW], tool_choice=named,
                                            temperature=1.0, seed=5, max_tokens=200, stream=True)
    chunks = list(stream)
    deltas = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function.name == "get_weather"
    assert deltas[0].function.arguments == call.function.arguments        # same seed, same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    bad = httpx.post(served_long + "/v1/chat/completions", json={"messages": msgs, "tool_choice": "required", "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tools", bad.text
    # auto: a tiny model answers in text; its reply carries no tool calls and finishes with "stop"/"length"
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=[WEATHER], max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.tool_calls is None


def test_tool_call_parsing_and_stream_holdback():
    from nanoseek.inference.tools import ToolCallStream, parse_tool_calls
    from nanoseek.tokenizer import tool_calls_text
    calls = [{"type": "function", "function": {"name": "now", "arguments": "{}"}},
             {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome", "days": 2}'}}]
    text = "Let me check." + tool_calls_text(calls)
    content, got = parse_tool_calls(text)
    assert content == "Let me check." and [c["function"] for c in got] == [c["function"] for c in calls]
    assert parse_tool_calls("plain text") == ("plain text", [])
    cut = text[: text.index("```json") + 9]                        # cut off by max_tokens: stays text
    assert parse_tool_calls(cut) == (cut, [])
    from nanoseek.tokenizer import TOOL_CALL_BEGIN, TOOL_CALLS_END
    half = text[: text.rindex(TOOL_CALL_BEGIN) + 30] + TOOL_CALLS_END    # a malformed second call: all stays text
    assert parse_tool_calls(half) == (half, [])
    after = text + TOOL_CALL_BEGIN + "function<｜tool▁sep｜>x\n```json\n{}\n```<｜tool▁call▁end｜>"
    assert [c["function"]["name"] for c in parse_tool_calls(after)[1]] == ["now", "get_weather"]    # not past the end
    for size in (1, 3, 7, 50):                                     # any chunking streams the same content
        ts, sent = ToolCallStream(), ""
        for i in range(0, len(text), size):
            sent += ts.feed(text[i: i + size])
        rest, got = ts.finish()
        assert sent + rest == "Let me check." and len(got) == 2
    ts = ToolCallStream()                                          # a lone "<" is held back, then released
    assert ts.feed("a <") == "a " and ts.feed("b") == "<b" and ts.finish() == ("", [])


def test_no_delayed_ack_stall(url):
    """Connections get TCP_NODELAY (the listening socket keeps IPPROTO_TCP): without it every response
    stalled ~40 ms on the client's delayed ACK, /health included (measured 44 ms -> 1.6 ms)."""
    import socket
    import statistics
    sock = listen("127.0.0.1", 0)
    assert sock.proto == socket.IPPROTO_TCP
    sock.close()
    with httpx.Client(timeout=10) as h:
        h.get(url + "/health")
        times = []
        for _ in range(15):
            t = time.perf_counter()
            h.get(url + "/health")
            times.append(time.perf_counter() - t)
    assert statistics.median(times) < 0.02, times


def test_prompt_logprobs_batched_equal_one_forward_each(ref):
    """Prompts of mixed lengths grouped into padded forwards, the head run a few rows at a time, equal
    one unpadded forward per prompt (which is what the model says about each prompt alone)."""
    import torch

    g = torch.Generator().manual_seed(0)
    V = ref.model.cfg.vocab_size
    prompts = [torch.randint(2, V, (n,), generator=g).tolist() for n in (7, 1, 30, 2, 12, 30, 5)]
    got = ref.prompt_logprobs(prompts, top=3, max_tokens=40, head_rows=5)
    from nanoseek.common import UserError
    with pytest.raises(UserError, match="prompt 1 must be a non-empty list of token ids"):
        ref.prompt_logprobs([[1, 2], [5, V]])
    for ids, (lps, tops) in zip(prompts, got):
        assert len(lps) == len(ids) and lps[0] is None
        if len(ids) < 2:
            continue
        with torch.no_grad():
            lp = torch.log_softmax(ref.model(torch.tensor([ids]))[0, :-1].float(), dim=-1)
        want = lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        assert torch.allclose(torch.tensor(lps[1:]), want, atol=1e-5)
        assert len(tops) == len(ids) and tops[0] is None
        best = lp.topk(3, dim=-1)
        for t, (v, i) in enumerate(zip(best.values, best.indices)):
            assert set(tops[t + 1]) == set(i.tolist())
            assert max(abs(tops[t + 1][k] - x) for k, x in zip(i.tolist(), v.tolist())) < 1e-5
