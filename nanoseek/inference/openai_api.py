"""OpenAI request parsing for the HTTP server (response shapes: responses.py).

Every user mistake becomes an `ApiError` (HTTP 400, `{"error": {"message", "type", "param", "code"}}`)
naming the field; sampling fields map onto `SamplingParams`, `response_format` and forced tool calls
onto its grammar (structured.py, tools.py).
"""
from __future__ import annotations

import dataclasses
import json
import re

from ..common import UserError
from ..tokenizer import THINK
from .sampling import SamplingParams
from .worker import ApiError


# requests: every user mistake becomes ApiError(400, ..., param=<the field>)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
UNSUPPORTED = {"functions": (None,), "function_call": (None,), "suffix": (None,), "best_of": (None, 1)}
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
JSON_TYPES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
              dict: "an object", type(None): "null"}


@dataclasses.dataclass
class Parsed:
    prompts: list[list[int]]             # token ids, one engine request each
    params: SamplingParams
    stream: bool
    include_usage: bool
    in_reasoning: bool = False           # chat: the prompt already opened <think>
    echo: bool = False                   # completions: return the prompt (and its log-probs) before the text
    generate: bool = True                # False: max_tokens 0 with echo (score the prompt, generate nothing)
    param: str = "prompt"                # the field that holds the prompt ("messages" for chat)
    tools: bool = False                  # chat: parse tool calls out of the reply


def field(body: dict, name: str, typ: type, default=None, param: str | None = None):
    """body[name] checked against a JSON type (bool is not a number), or `default` when absent/null."""
    v = body.get(name)
    if v is None:
        return default
    if typ is int and isinstance(v, float) and v.is_integer():
        v = int(v)                        # JSON Schema's integer: 2.0 is one
    ok = isinstance(v, (int, float)) if typ is float else isinstance(v, typ)
    if not ok or (typ in (int, float) and isinstance(v, bool)):
        param = param or name
        raise ApiError(400, f"Invalid type for '{param}': expected {JSON_TYPES[typ]}, but got "
                            f"{JSON_TYPES.get(type(v), type(v).__name__)}.", param, "invalid_type")
    if typ is float:
        try:
            v = float(v)
        except OverflowError:
            v = float("inf")
        if v != v or v in (float("inf"), float("-inf")):
            raise ApiError(400, f"Invalid value for '{param or name}': it must be a finite number.", param or name,
                           "invalid_value")
    return v


def require(ok: bool, name: str, value, rule: str) -> None:
    if not ok:
        raise ApiError(400, f"Invalid value for '{name}': {value!r}; it must be {rule}.", name, "invalid_value")


def parse_common(body: dict, engine, chat: bool, after_token: int | None = None, grammar: str | None = None
                 ) -> tuple[SamplingParams, bool, bool, bool, bool]:
    """The fields chat and completions share -> (SamplingParams, stream, include_usage, echo, generate).
    `after_token`: a structured output starts after this token (the reasoning's end). `grammar`: a
    forced tool call's, which wins over response_format."""
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in allowed:
            raise ApiError(400, f"'{name}' is not supported by the nanoseek server.", name, "unsupported_parameter")
    if chat and body.get("echo") not in (None, False):
        raise ApiError(400, "'echo' is a /v1/completions parameter.", "echo", "unsupported_parameter")
    echo = field(body, "echo", bool, False)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = field(body, key, int, engine.max_len if chat else 16)   # OpenAI's legacy default is 16
    require(max_tokens >= (0 if echo else 1), key, max_tokens, "at least 1 (0 only with 'echo': true)")
    if echo and field(body, "stream", bool, False):
        raise ApiError(400, "'echo' with 'stream' is not supported: request the prompt's log-probs without "
                            "streaming.", "echo", "unsupported_parameter")
    temperature = field(body, "temperature", float, 1.0)
    require(0 <= temperature <= 2, "temperature", temperature, "between 0 and 2 (0 = greedy)")
    top_p = field(body, "top_p", float, 1.0)
    require(0 < top_p <= 1, "top_p", top_p, "in (0, 1]")
    top_k = field(body, "top_k", int, -1)
    require(-1 <= top_k < 2**31, "top_k", top_k, "-1 or 0 (off) or a positive integer below 2^31")
    n = field(body, "n", int, 1)
    require(1 <= n <= engine.max_batch, "n", n, f"between 1 and {engine.max_batch} (the server's --max-batch)")
    seed = field(body, "seed", int)
    require(seed is None or -2**63 <= seed < 2**63 - n, "seed", seed, "a 64-bit integer")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    require(stop is None or isinstance(stop, list) and all(isinstance(s, str) and s for s in stop), "stop",
            body.get("stop"), "a non-empty string or a list of non-empty strings")
    if chat:                              # chat: logprobs is a boolean, top_logprobs the count
        top = field(body, "top_logprobs", int)
        require(top is None or 0 <= top <= 20, "top_logprobs", top, "between 0 and 20")
        want = field(body, "logprobs", bool, False)
        require(not top or want, "top_logprobs", top, "used together with 'logprobs': true")
        logprobs = (top or 0) if want else None
    else:                                 # completions: logprobs is the count
        logprobs = field(body, "logprobs", int)
        require(logprobs is None or 0 <= logprobs <= 20, "logprobs", logprobs, "between 0 and 20")
    penalties = {k: field(body, k, float, d) for k, d in (("presence_penalty", 0.0), ("frequency_penalty", 0.0),
                                                           ("repetition_penalty", 1.0), ("min_p", 0.0))}
    require(-2 <= penalties["presence_penalty"] <= 2, "presence_penalty", penalties["presence_penalty"], "in [-2, 2]")
    require(-2 <= penalties["frequency_penalty"] <= 2, "frequency_penalty", penalties["frequency_penalty"],
            "in [-2, 2]")
    require(0.01 <= penalties["repetition_penalty"] <= 100, "repetition_penalty", penalties["repetition_penalty"],
            "in [0.01, 100]")
    require(0 <= penalties["min_p"] <= 1, "min_p", penalties["min_p"], "in [0, 1]")
    raw_bias = field(body, "logit_bias", dict, {})
    require(len(raw_bias) <= 300, "logit_bias", f"{len(raw_bias)} entries", "at most 300 entries (as OpenAI)")
    logit_bias = {}
    for k, v in raw_bias.items():          # OpenAI: {"<token id>": bias in [-100, 100]}
        ok = k.isascii() and k.isdigit() and len(k) <= 10 and int(k) < engine.model.cfg.vocab_size \
            and isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
        require(ok, "logit_bias", {k: v}, "token ids of this model mapped to numbers in [-100, 100]")
        logit_bias[int(k)] = float(v)
    response_grammar = parse_response_format(body, engine, after_token)       # checked even when a tool call is forced
    grammar = grammar or response_grammar
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    include_usage = field(options, "include_usage", bool, False, "stream_options.include_usage")
    try:
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max(1, max_tokens),
                                stop=stop, seed=seed, logprobs=logprobs, logit_bias=logit_bias, grammar=grammar,
                                **penalties)
    except UserError as e:               # a rule checked only by SamplingParams: name its field
        m = re.search(r"SamplingParams\.(\w+)", str(e))
        raise ApiError(400, str(e), m.group(1) if m else None, "invalid_value") from None
    return params, stream, include_usage, echo, max_tokens > 0


def parse_response_format(body: dict, engine, after_token: int | None = None) -> str | None:
    """OpenAI's `response_format` -> llguidance grammar text (None for plain text), checked against the
    model's tokenizer so a bad schema is a 400 naming it, before any engine work. `after_token`: the
    document follows the reasoning and this token (`</think>` when the prompt opened `<think>`)."""
    rf = field(body, "response_format", dict)
    if rf is None:
        return None
    kind = rf.get("type")
    spec = field(rf, "json_schema", dict, None, "response_format.json_schema")
    if spec is not None:
        field(spec, "name", str, None, "response_format.json_schema.name")
        field(spec, "strict", bool, None, "response_format.json_schema.strict")
        field(spec, "schema", dict, None, "response_format.json_schema.schema")
    if kind == "text":
        return None
    from .structured import json_object_grammar, json_schema_grammar
    if kind == "json_object":
        grammar, param = json_object_grammar(after_token), "response_format"
    elif kind == "json_schema":
        require(spec is not None, "response_format.json_schema", spec,
                "an object {'name': ..., 'schema': {...}} for type 'json_schema'")
        schema = field(spec, "schema", dict, {"type": "object"}, "response_format.json_schema.schema")
        param = "response_format.json_schema.schema"
        if spec.get("strict") and schema.get("type") == "object" and "additionalProperties" not in schema:
            schema = {**schema, "additionalProperties": False}     # OpenAI's strict mode: no extra keys
        try:
            grammar = json_schema_grammar(schema, after_token)
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"Invalid schema for 'response_format': {e}", param, "invalid_value") from None
    else:
        raise ApiError(400, f"Invalid value for 'response_format.type': {kind!r}. Supported values are: 'text', "
                            "'json_object' and 'json_schema'.", "response_format.type", "invalid_value")
    try:
        engine.grammars.check(grammar)
    except UserError as e:
        raise ApiError(400, f"Invalid 'response_format': {e}", param, "invalid_value") from None
    return grammar


def check_context(ids: list[int], engine, param: str) -> None:
    if not ids:
        raise ApiError(400, f"'{param}' is empty: give at least one token.", param, "invalid_value")
    if len(ids) >= engine.max_len:
        raise ApiError(400, f"This model's maximum context length is {engine.max_len} tokens, but the prompt has "
                            f"{len(ids)} tokens. Shorten the prompt.", param, "context_length_exceeded")


def longest_token_chars(tokenizer) -> int:
    """Characters in the longest vocabulary entry: a text of C characters needs at least C / this tokens,
    which refuses an oversized prompt without tokenizing it."""
    hf = getattr(tokenizer, "_tok", None) or getattr(tokenizer, "hf", None)
    vocab = hf.get_vocab(with_added_tokens=True) if hf is not None and hasattr(hf, "get_vocab") else {}
    return max((len(t) for t in vocab), default=64)


def check_chars(text_chars: int, max_chars: int | None, engine, param: str) -> None:
    if max_chars is not None and text_chars > max_chars:
        raise ApiError(400, f"This model's maximum context length is {engine.max_len} tokens, and '{param}' has "
                            f"{text_chars:,} characters: more tokens than that whatever they are. Shorten it.",
                       param, "context_length_exceeded")


def check_unicode(text: str, param: str) -> None:
    """JSON can carry a lone UTF-16 surrogate ("\\ud800"), which is not text: the tokenizer would raise."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise ApiError(400, f"'{param}' holds a lone UTF-16 surrogate (\\u{ord(bad):04x}) at character {e.start}, "
                            "which is not valid Unicode text; send it as a surrogate pair or remove it.",
                       param, "invalid_value") from None


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if messages is None:
        raise ApiError(400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    field(body, "messages", list)
    if not messages:
        raise ApiError(400, "'messages' must hold at least one message.", "messages", "empty_array")
    out = []
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"Invalid type for '{p}': expected an object with 'role' and 'content'.", p,
                           "invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(400, f"Invalid value for '{p}.role': {role!r}. Supported values are: "
                                f"{', '.join(repr(r) for r in ROLES)}.", f"{p}.role", "invalid_value")
        calls = m.get("tool_calls")
        if calls is not None:
            require(role == "assistant" and isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
                and isinstance(c["function"].get("arguments"), str) for c in calls), f"{p}.tool_calls", calls,
                "on an assistant message, a list of {'id', 'type': 'function', 'function': {'name', 'arguments'}}")
            for j, c in enumerate(calls):
                check_unicode(c["function"]["name"] + c["function"]["arguments"], f"{p}.tool_calls[{j}]")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):     # OpenAI content parts: only text parts
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"'{p}.content[{j}]' must be {{'type': 'text', 'text': <string>}}: "
                                        "this model reads text only.", f"{p}.content[{j}]", "invalid_value")
                texts.append(part["text"])
            content = "\n".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"Invalid type for '{p}.content': expected a string or a list of text parts.",
                           f"{p}.content", "invalid_type")
        check_unicode(content, f"{p}.content")
        out.append({"role": ROLES[role], "content": content, **({"tool_calls": calls} if calls else {})})
    return out


@dataclasses.dataclass
class ToolRequest:
    tools: list | None = None            # for the chat template
    forced: bool = False                 # tool_choice 'required' or a named function: decoding is constrained
    name: str | None = None              # the named function
    parallel: bool = True                # parallel_tool_calls
    parse: bool = False                  # parse calls out of the reply

    def grammar(self, engine, after_token: int | None) -> str | None:
        if not self.forced:
            return None
        from .tools import tool_call_grammar
        grammar = tool_call_grammar(self.tools, self.name, self.parallel, after_token)
        try:
            engine.grammars.check(grammar)
        except UserError as e:
            raise ApiError(400, f"Invalid 'tools': {e}", "tools", "invalid_value") from None
        return grammar


def parse_tools(body: dict) -> ToolRequest:
    """`tools`, `tool_choice`, `parallel_tool_calls`, checked."""
    tools = field(body, "tools", list)
    choice = body.get("tool_choice")
    parallel = field(body, "parallel_tool_calls", bool, True)
    if not tools:
        require(choice in (None, "none", "auto"), "tool_choice", choice, "'none' or 'auto' when no 'tools' are given")
        return ToolRequest()
    names = []
    for k, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        ok = isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(f, dict) \
            and isinstance(f.get("name"), str) and TOOL_NAME.fullmatch(f["name"]) is not None \
            and isinstance(f.get("description", ""), (str, type(None))) and isinstance(f.get("parameters", {}), dict)
        require(ok, f"tools[{k}]", t, "{'type': 'function', 'function': {'name': <letters, digits, _ or -, at most 64>, "
                "'description': <string>, 'parameters': <JSON Schema object>}}")
        check_unicode(json.dumps(t, ensure_ascii=False), f"tools[{k}]")
        names.append(f["name"])
    name = None
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        require(choice.get("type") == "function" and name in names, "tool_choice", choice,
                f"'none', 'auto', 'required' or {{'type': 'function', 'function': {{'name': one of {names}}}}}")
    else:
        require(choice in (None, "none", "auto", "required"), "tool_choice", choice,
                "'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")
    return ToolRequest(tools, forced=choice not in (None, "none", "auto"), name=name, parallel=parallel,
                       parse=choice != "none")


def parse_chat(body: dict, llm, max_chars: int | None = None) -> Parsed:
    messages = parse_messages(body)
    tools = parse_tools(body)
    chars = sum(len(m["content"]) + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls", ()))
                for m in messages)
    check_chars(chars + (len(json.dumps(tools.tools)) if tools.tools else 0), max_chars, llm.engine, "messages")
    kwargs = field(body, "chat_template_kwargs", dict, {})
    thinking = field(body, "thinking", bool, field(kwargs, "thinking", bool, False, "chat_template_kwargs.thinking"))
    if llm.tokenizer is None:
        raise ApiError(400, "this model directory has no tokenizer, so chat is unavailable; use /v1/completions "
                            "with token-id prompts", "messages", "no_tokenizer")
    try:
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking,
                                                 **({"tools": tools.tools} if tools.tools else {}))
    except ValueError as e:
        raise ApiError(400, str(e), "messages", "invalid_value") from None
    ids = llm.tokenizer.encode(text)
    check_context(ids, llm.engine, "messages")
    in_reasoning = text.rstrip().endswith(THINK)
    after = getattr(llm.tokenizer, "think_end_id", None) if in_reasoning else None
    params, stream, include_usage, _, _ = parse_common(body, llm.engine, chat=True, after_token=after,
                                                       grammar=tools.grammar(llm.engine, after))
    if params.grammar is not None and in_reasoning and after is None:
        in_reasoning = False          # no single </think> token to wait for: the constrained reply is the content
    return Parsed([ids], params, stream, include_usage, in_reasoning, "messages", tools=tools.parse)


def is_token_ids(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion(body: dict, llm, max_chars: int | None = None) -> Parsed:
    prompt = body.get("prompt")
    if prompt is None:
        raise ApiError(400, "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter")
    if isinstance(prompt, str) or (is_token_ids(prompt) and prompt):
        prompt = [prompt]
    if not (isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_token_ids(p) for p in prompt)):
        raise ApiError(400, "Invalid type for 'prompt': expected a string, a list of strings, a list of token ids "
                            "or a list of token-id lists.", "prompt", "invalid_type")
    prompts, V = [], llm.model.cfg.vocab_size
    for p in prompt:
        if isinstance(p, str):
            if llm.tokenizer is None:
                raise ApiError(400, "this model directory has no tokenizer: send token-id prompts", "prompt",
                               "no_tokenizer")
            check_chars(len(p), max_chars, llm.engine, "prompt")
            check_unicode(p, "prompt")
            p = llm.encode_prompt(p)[1]
        require(all(0 <= t < V for t in p), "prompt", "token ids", f"in [0, {V}) (the vocabulary)")
        check_context(p, llm.engine, "prompt")
        prompts.append(p)
    params, stream, include_usage, echo, generate = parse_common(body, llm.engine, chat=False)
    return Parsed(prompts, params, stream, include_usage, echo=echo, generate=generate)
