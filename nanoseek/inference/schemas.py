"""The API's request and response bodies as pydantic models, for `/openapi.json` (and its readers:
client generators, schemathesis, API explorers).

The handlers do not let FastAPI validate bodies against these: openai_api.py parses them by hand so
that a body over the size limit is refused before it is read, oversized prompts before they are
tokenized, and every mistake gets OpenAI's error shape naming the field. These models document the
same rules (types, ranges, required fields); tests check that the server's responses conform to them
(schemathesis `response_schema_conformance`).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")     # unknown fields are ignored, as OpenAI's API does


# ------------------------------------------------------------------------------------------------ requests
class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class PromptMessage(_Open):
    role: Literal["system", "developer", "user"]
    content: str | list[TextPart]


class AssistantTurn(_Open):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="the calls this turn made")


class ToolResult(_Open):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str | None = Field(None, description="the call it answers")


Message = PromptMessage | AssistantTurn | ToolResult


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="a JSON Schema of the arguments")


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str = Field(description="one of the request's tools")


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(BaseModel):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="default: any JSON object")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(None, description="required with type 'json_schema'")


class StreamOptions(BaseModel):
    include_usage: bool | None = None


TokenId = Annotated[int, Field(ge=0, description="an id of the model's vocabulary")]


class _Sampling(_Open):
    model: str | None = Field(None, description="the served model's name (others: 404)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=2**31, description="-1 or 0: off")
    n: int | None = Field(None, ge=1, description="at most the server's --max-batch")
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    min_p: float | None = Field(None, ge=0, le=1)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,10}$")], Annotated[float, Field(ge=-100, le=100)]] | None = \
        Field(None, max_length=300, description="token id -> bias in [-100, 100]")
    response_format: ResponseFormat | None = None


class ChatCompletionRequest(_Sampling):
    # top_logprobs > 0 needs logprobs: true (as OpenAI); tool_choice other than none/auto needs tools
    model_config = ConfigDict(extra="allow", json_schema_extra={"allOf": [
        {"if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer", "minimum": 1}}},
         "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}},
        {"if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": ["none", "auto", None]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}]})
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: true")
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    thinking: bool | None = Field(None, description="R1 template: open the reply with <think>")
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    # max_tokens 0 only with echo: true (score the prompt, generate nothing)
    model_config = ConfigDict(extra="allow", json_schema_extra={
        "if": {"required": ["max_tokens"], "properties": {"max_tokens": {"const": 0}}},
        "then": {"required": ["echo"], "properties": {"echo": {"const": True}}}})
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)] | \
        Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)] = Field(
        description="text, texts (at most 2048), token ids, or lists of token ids")
    max_tokens: int | None = Field(None, ge=0, description="default 16; 0 only with echo")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = Field(None, description="return the prompt (and its log-probs) first; not with stream")


# ------------------------------------------------------------------------------------------------ responses
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: str | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    reasoning_content: str | None = Field(None, description="the <think> part of an R1 reply")
    tool_calls: list[ToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls", "abort"] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason
    logprobs: CompletionLogprobs | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class Error(BaseModel):
    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    running: int


ERRORS = {400: "a malformed or invalid request (the error names the field)", 401: "a missing or wrong API key",
          404: "an unknown model", 413: "a body over --max-body-mb", 500: "a server fault",
          503: "the engine thread is not running"}


def responses(ok: type[BaseModel], *codes: int, stream: bool = False) -> dict:
    """A route's documented responses: `ok` as JSON (and an SSE stream with `stream`), errors by code."""
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": "a chunk (chat.completion.chunk or text_completion) as JSON; the last "
                                         "event is [DONE]"}}}     # OpenAPI < 3.2: `schema` describes one event
    out = {200: {"model": ok, **({"content": {"text/event-stream": {"schema": event}}} if stream else {})}}
    return {**out, **{c: {"model": Error, "description": ERRORS[c]} for c in codes}}


def request_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` for a route whose body is parsed by hand: the body's schema, by reference."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def add_request_schemas(spec: dict, models: list[type[BaseModel]], vocab_size: int, max_batch: int) -> dict:
    """Put the request models (and the models they use) into an OpenAPI document's components, with
    this server's bounds: token ids below the vocabulary size, `n` up to --max-batch."""
    def bound(node):
        if isinstance(node, dict):
            if node.get("description") == "an id of the model's vocabulary":
                node["maximum"] = vocab_size - 1
            for v in node.values():
                bound(v)
        elif isinstance(node, list):
            for v in node:
                bound(v)

    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for m in models:
        js = m.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
        schemas.update(js.pop("$defs", {}))
        js["properties"]["n"] = {**js["properties"]["n"], "anyOf": [{"type": "integer", "minimum": 1,
                                                                     "maximum": max_batch}, {"type": "null"}]}
        bound(js)
        schemas[m.__name__] = js
    return spec
