"""Tool calls in OpenAI's format on DeepSeek-V3's markup (tokenizer.tool_calls_text):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```<｜tool▁call▁end｜>
        [\\n<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>]...<｜tool▁calls▁end｜>

- `tool_choice` "required" or a named function: decoding is constrained (structured.py) to that markup,
  a declared function's name and arguments valid under its `parameters` schema, so the reply always
  parses. "auto": the model decides; its text is parsed, and markup that does not parse stays text.
- `parse_tool_calls` turns a completion's text into (content, calls); `ToolCallStream` does it for a
  stream: text before the markup streams as content, the calls come as one delta when the choice ends.
"""
from __future__ import annotations

import json
import re
import uuid

from ..tokenizer import TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_SEP
from .structured import after_reasoning, with_json_options

_CALL = re.compile(re.escape(TOOL_CALL_BEGIN) + r"(\w+)" + re.escape(TOOL_SEP) + r"([^\n]+)\n```json\n(.*?)\n```"
                   + re.escape(TOOL_CALL_END), re.S)


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)      # a Lark string literal


def tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True,
                      after_token: int | None = None) -> str:
    """llguidance grammar for a reply that is only tool calls: of `name` (one call), else of any declared
    tool (several when `parallel`). `after_token`: reasoning text and that token (`</think>`) first."""
    fns = [t.get("function", t) for t in tools]
    if name is not None:
        fns = [f for f in fns if f["name"] == name]
    rules = [f"call: {_lit(TOOL_CALL_BEGIN + 'function' + TOOL_SEP)} ({' | '.join(f'fn{k}' for k in range(len(fns)))})"
             f" {_lit(TOOL_CALL_END)}"]
    for k, f in enumerate(fns):
        schema = with_json_options(f.get("parameters") or {"type": "object"})
        rules += [f"fn{k}: {_lit(f['name'] + chr(10) + '```json' + chr(10))} args{k} {_lit(chr(10) + '```')}",
                  f"args{k}: %json {json.dumps(schema)}"]
    more = f' ({_lit(chr(10))} call)*' if parallel and name is None else ""
    return after_reasoning(f"{_lit(TOOL_CALLS_BEGIN)} call{more} {_lit(TOOL_CALLS_END)}", rules, after_token)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """A reply's text -> (content before the markup, calls in OpenAI's shape). Markup that does not parse
    whole (a call cut off by max_tokens, a malformed one, no closing marker) is left in the content with
    no calls."""
    start = text.find(TOOL_CALLS_BEGIN)
    end = text.find(TOOL_CALLS_END, start + 1)
    if start < 0 or end < 0:
        return text, []
    block = text[start + len(TOOL_CALLS_BEGIN): end]
    found = _CALL.findall(block)
    if not found or len(found) != block.count(TOOL_CALL_BEGIN):
        return text, []
    calls = [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
              "function": {"name": name.strip(), "arguments": args}} for _kind, name, args in found]
    return text[:start], calls


class ToolCallStream:
    """Streams a reply's content up to the tool-call markup (holding back a possible start of it), then
    keeps the rest; `finish()` returns (content still to send, calls)."""

    def __init__(self):
        self.held, self.in_calls = "", False

    def feed(self, text: str) -> str:
        """New text -> the content that can be sent now."""
        self.held += text
        if self.in_calls:
            return ""
        i = self.held.find(TOOL_CALLS_BEGIN)
        if i >= 0:
            self.in_calls = True
            out, self.held = self.held[:i], self.held[i:]
            return out
        keep = next((k for k in range(min(len(TOOL_CALLS_BEGIN) - 1, len(self.held)), 0, -1)
                     if TOOL_CALLS_BEGIN.startswith(self.held[-k:])), 0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(self.held)
        self.held = ""
        return content, calls
