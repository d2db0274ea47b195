"""OpenAI response shapes for the HTTP server: `Choice` accumulates one choice's tokens, text and
log-probs (in the chat and the legacy-completion formats), `ResponseBuilder` turns a request's events
into its JSON body or its SSE chunks."""
from __future__ import annotations

import json
import time

from .openai_api import Parsed
from .stream import ReasoningSplitter
from .tools import ToolCallStream, parse_tool_calls
from .worker import Delta

def byte_symbols() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in character -> the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + i): b for i, b in enumerate(extra)}}


class Choice:
    """What one choice has produced so far, and how it prints token log-probs."""

    def __init__(self, tokenizer, byte_of: dict[str, int]):
        self.tok, self.byte_of = tokenizer, byte_of
        self.text, self.finish_reason, self.offset = "", None, 0
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []

    def add(self, ev: Delta) -> None:
        self.text += ev.text
        self.finish_reason = ev.finish_reason
        self.token_ids += ev.token_ids
        self.logprobs += ev.logprobs
        self.top += ev.top_logprobs

    def whole(self) -> Delta:
        return Delta(-1, self.text, self.token_ids, self.logprobs, self.top, self.finish_reason)

    def token(self, i: int) -> tuple[str, list[int]]:
        if self.tok is None:
            return str(i), []
        try:
            text, piece = self.tok.decode([i], skip_special_tokens=False), self.tok.id_to_token(i)
        except (KeyError, IndexError, TypeError):     # an id of the model's vocabulary the tokenizer lacks
            return "", []
        if piece is None:
            return text, list(text.encode())
        raw = bytes(self.byte_of[c] for c in piece) if all(c in self.byte_of for c in piece) else text.encode()
        return text, list(raw)

    def chat_logprobs(self, ev: Delta) -> dict:
        def entry(i, lp):
            text, raw = self.token(i)
            return {"token": text, "logprob": max(lp, -9999.0), "bytes": raw}
        content = [{**entry(i, lp), "top_logprobs": [entry(t, tlp) for t, tlp in top.items()]}
                   for i, lp, top in zip(ev.token_ids, ev.logprobs, ev.top_logprobs or [{}] * len(ev.token_ids))]
        return {"content": content, "refusal": None}

    def echo_logprobs(self, ids: list[int], token_lp: list, tops: list) -> dict:
        """The prompt part of an echoed completion's log-probs (first token: null), advancing the offset."""
        tokens, offsets = [], []
        for i in ids:
            tokens.append(self.token(i)[0])
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {"tokens": tokens, "token_logprobs": [None if lp is None else max(lp, -9999.0) for lp in token_lp],
                "top_logprobs": [None if t is None else {self.token(k)[0]: max(v, -9999.0) for k, v in t.items()}
                                 for t in tops] if len(tops) == len(ids) else None,
                "text_offset": offsets}

    def completion_logprobs(self, ev: Delta) -> dict:
        tokens, offsets = [], []
        for i in ev.token_ids:
            tokens.append(self.token(i)[0])
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        tops = [{self.token(t)[0]: max(lp, -9999.0) for t, lp in top.items()} for top in ev.top_logprobs]
        return {"tokens": tokens, "token_logprobs": [max(lp, -9999.0) for lp in ev.logprobs],
                "top_logprobs": tops or None, "text_offset": offsets}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ResponseBuilder:
    """One request's response, built from the Deltas its jobs send: `add(ev)` accumulates, then either
    `to_json()` (the whole chat.completion / text_completion body) or, event by event, `chunks(ev)`
    (its SSE lines) and `tail()` (the usage chunk, if asked for). Chat replies are split into
    `reasoning_content` and `content`, and into tool calls when the request declared tools."""

    def __init__(self, p: Parsed, chat: bool, rid: str, model_name: str, tokenizer, byte_of: dict,
                 echoed: list | None = None):
        self.p, self.chat, self.echoed = p, chat, echoed
        self.choices = [Choice(tokenizer, byte_of) for _ in range(p.params.n * len(p.prompts))]
        if not p.generate:                 # echo with max_tokens 0: the prompt's log-probs only
            for c in self.choices:
                c.finish_reason = "length"
        self.head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                     "created": int(time.time()), "model": model_name}
        self.logprobs = p.params.logprobs is not None
        self.splitters = [ReasoningSplitter(p.in_reasoning) for _ in self.choices]
        self.tool_streams = [ToolCallStream() for _ in self.choices] if p.tools else None
        self.role_sent = not chat

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def add(self, ev: Delta) -> None:
        self.choices[ev.index].add(ev)

    def usage(self) -> dict:
        prompt, completion = sum(map(len, self.p.prompts)), sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # -------------------------------------------------------------------------------- whole response
    def to_json(self) -> dict:
        return {**self.head, "choices": [self._chat_choice(i) if self.chat else self._completion_choice(i)
                                         for i in range(len(self.choices))], "usage": self.usage()}

    def _chat_choice(self, i: int) -> dict:
        c = self.choices[i]
        splitter = ReasoningSplitter(self.p.in_reasoning)
        reasoning, content = splitter.split(c.text)
        message, finish = {"role": "assistant", "content": content}, c.finish_reason
        if self.p.tools:
            content, calls = parse_tool_calls(content)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                finish = "tool_calls" if finish == "stop" else finish
        if splitter.saw_reasoning:
            message["reasoning_content"] = reasoning
        return {"index": i, "message": message, "finish_reason": finish,
                "logprobs": c.chat_logprobs(c.whole()) if self.logprobs else None}

    def _completion_choice(self, i: int) -> dict:
        c, n = self.choices[i], self.p.params.n
        text, lps = c.text, None
        if self.p.echo:                    # the prompt first: its text and log-probs
            ids = self.p.prompts[i // n]
            text = "".join(c.token(t)[0] for t in ids) + text
            if self.logprobs:
                lps = c.echo_logprobs(ids, *self.echoed[i // n])
        if self.logprobs:
            gen = c.completion_logprobs(c.whole())
            lps = gen if lps is None else {k: None if lps[k] is None and gen[k] is None else
                                           (lps[k] or []) + (gen[k] or []) for k in lps}
        return {"index": i, "text": text, "finish_reason": c.finish_reason, "logprobs": lps}

    # -------------------------------------------------------------------------------- stream
    def _chunk(self, i: int, body: dict, logprobs=None, finish_reason=None) -> str:
        head = {**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion"}
        return sse({**head, "choices": [{"index": i, **body, "logprobs": logprobs, "finish_reason": finish_reason}],
                    **({"usage": None} if self.p.include_usage else {})})

    def chunks(self, ev: Delta):
        """The SSE lines for one event (already `add`ed). A chat stream's first chunk carries the role and
        goes out with the first event, so a stream's first chunk marks its first token."""
        if not self.role_sent:
            self.role_sent = True
            for i in range(len(self.choices)):
                yield self._chunk(i, {"delta": {"role": "assistant", "content": ""}})
        c, final = self.choices[ev.index], ev.finish_reason is not None
        if not self.chat:
            if ev.text or final or self.logprobs:
                yield self._chunk(ev.index, {"text": ev.text}, c.completion_logprobs(ev) if self.logprobs else None,
                                  ev.finish_reason)
            return
        reasoning, content = self.splitters[ev.index].feed(ev.text, final)
        calls, finish = [], ev.finish_reason
        if self.tool_streams is not None:  # content up to the tool-call markup streams
            content = self.tool_streams[ev.index].feed(content)
            if final:
                rest, calls = self.tool_streams[ev.index].finish()
                content += rest
                finish = "tool_calls" if calls and finish == "stop" else finish
        delta = {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}
        lp = c.chat_logprobs(ev) if self.logprobs and ev.token_ids else None
        if delta or lp:
            yield self._chunk(ev.index, {"delta": delta}, lp)
        if calls:
            yield self._chunk(ev.index, {"delta": {"tool_calls": [{"index": k, **call}
                                                                  for k, call in enumerate(calls)]}})
        if final:
            yield self._chunk(ev.index, {"delta": {}}, None, finish)

    def tail(self):
        if self.p.include_usage:
            yield sse({**self.head, "object": "chat.completion.chunk" if self.chat else "text_completion",
                       "choices": [], "usage": self.usage()})
