"""OpenAI-compatible HTTP server: `nanoseek serve MODEL_DIR`, then any OpenAI client.

    client ──HTTP──▶ FastAPI handler (asyncio loop) ── submit(job) ──▶ queue.Queue (thread safe)
                                                                         │
                     EngineWorker thread: the ONLY caller of engine.add_request / step / abort
                                                                         │
    client ◀─JSON or SSE── handler ◀── asyncio.Queue ◀── loop.call_soon_threadsafe(put_nowait, event)

Why one engine thread: the engine is not thread safe, and continuous batching wants every live
request inside the same `step()`. The worker drains its inbox before each step, so requests that
arrive while a step runs join the batch at the next one (their prefill), and a finished sequence
leaves its slot at once. When the engine is idle the worker blocks on the inbox (no polling).
A request that fails in the worker (add_request rejects it, its text cannot be decoded) fails only
itself; an exception in `step()` fails the requests of that batch (it cannot tell whose fault it
was) and the worker goes on; if the worker dies anyway, every waiting handler and every later
request gets a 500 naming the cause, and /health turns 503.

Text is produced in the worker (worker.py) by the streaming pieces in stream.py; requests are parsed in
openai_api.py, responses shaped in responses.py, and documented for /openapi.json in schemas.py. This
file is the HTTP layer.

`/` serves a chat page (chat.html, shipped in the package, no CDN): it streams from
/v1/chat/completions, shows the reasoning in a collapsible block and keeps the conversation.


OpenAI contracts kept: response and chunk shapes (`chatcmpl-`/`cmpl-` ids, `usage`, SSE `data:`
lines ending with `data: [DONE]`), temperature 0 = greedy, the legacy completions default of
max_tokens=16, and errors as `{"error": {"message", "type", "param", "code"}}` - 400 for every
user mistake (FastAPI's 422 included), 401 for a bad API key, 404 for an unknown model. Extensions:
`top_k`, `thinking` (or `chat_template_kwargs.thinking`) for the R1 template, `repetition_penalty` and
`min_p` (vLLM's). `echo` with prompt log-probs on /v1/completions (not streamed); `logit_bias` and the
penalties; `response_format` (json_object, json_schema) and `tools`/`tool_choice` through grammar-constrained
decoding (structured.py, tools.py). Left out: suffix, best_of, the legacy `functions` (a 400 naming the field).
"""
import argparse
import asyncio
import hmac
import json
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..common import UserError

from .openai_api import Parsed, field, is_token_ids, longest_token_chars, parse_chat, parse_completion
from .responses import ResponseBuilder, byte_symbols, sse
from .schemas import (ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Health, ModelCard,
                      ModelList, add_request_schemas, request_body, responses)
from .stream import ReasoningSplitter, TextStream  # noqa: F401  (re-exported for tests)
from .worker import ApiError, EngineWorker, Job, next_event


# ------------------------------------------------------------------------------------------------
class Metrics:
    """Counters for `/metrics` (Prometheus text format), one instance per app: requests by endpoint and
    status, prompt and completion tokens, and the time to the response's start (for a stream: its first
    byte) as a histogram."""
    BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.tokens = {"prompt": 0, "completion": 0}
        self.latency = {ep: [0] * len(self.BUCKETS) for ep in ("chat", "completions")}
        self.latency_sum = {"chat": 0.0, "completions": 0.0}

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        for i, edge in enumerate(self.BUCKETS):
            if seconds <= edge:
                self.latency[endpoint][i] += 1
        self.latency_sum[endpoint] += seconds

    def add_tokens(self, usage: dict) -> None:
        self.tokens["prompt"] += usage["prompt_tokens"]
        self.tokens["completion"] += usage["completion_tokens"]

    def render(self, worker, engine) -> str:
        out = ["# HELP nanoseek_requests_total Requests by endpoint and HTTP status.",
               "# TYPE nanoseek_requests_total counter"]
        out += [f'nanoseek_requests_total{{endpoint="{ep}",status="{st}"}} {v}'
                for (ep, st), v in sorted(self.requests.items())]
        out += ["# HELP nanoseek_tokens_total Prompt and completion tokens of finished requests.",
                "# TYPE nanoseek_tokens_total counter"]
        out += [f'nanoseek_tokens_total{{kind="{k}"}} {v}' for k, v in self.tokens.items()]
        out += ["# HELP nanoseek_response_start_seconds Time to the response's start (streams: the first byte).",
                "# TYPE nanoseek_response_start_seconds histogram"]
        for ep, counts in self.latency.items():
            for edge, c in zip(self.BUCKETS, counts):
                le = "+Inf" if edge == float("inf") else edge
                out.append(f'nanoseek_response_start_seconds_bucket{{endpoint="{ep}",le="{le}"}} {c}')
            out += [f'nanoseek_response_start_seconds_sum{{endpoint="{ep}"}} {self.latency_sum[ep]:.6f}',
                    f'nanoseek_response_start_seconds_count{{endpoint="{ep}"}} {counts[-1]}']
        gauges = {"nanoseek_running_requests": (len(worker.jobs), "Requests the engine is working on."),
                  "nanoseek_waiting_requests": (len(engine.queued), "Requests queued for prefill."),
                  "nanoseek_running_sequences": (len(engine.running), "Sequences decoding.")}
        for name, (value, doc) in gauges.items():
            out += [f"# HELP {name} {doc}", f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(out) + "\n"


@dataclass
class Limits:
    """What one request may ask for, checked before any expensive work (body read, tokenization,
    engine time), each refused with an OpenAI-shaped error naming the limit and its flag."""
    max_body_bytes: int = 8 * 2**20          # --max-body-mb
    max_prompts: int = 2048                  # OpenAI's cap on a /v1/completions prompt array
    max_request_tokens: int = 1 << 20        # n x prompts x max_tokens (--max-request-tokens)


def build_app(llm, model_name: str = "nanoseek", api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving `llm`; its engine thread runs while the app is up (lifespan)."""
    try:
        from contextlib import asynccontextmanager

        from fastapi import Depends, FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError as e:
        raise UserError(f"the server needs fastapi and uvicorn ({e}): pip install fastapi uvicorn") from None

    worker = EngineWorker(llm)
    byte_of = byte_symbols()
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="nanoseek", description="OpenAI-compatible server for nanoseek models", lifespan=lifespan)
    app.state.worker = worker

    def openapi():                      # the hand-parsed request bodies, documented from schemas.py
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            spec = get_openapi(title=app.title, version="1", description=app.description, routes=app.routes)
            for ops in spec["paths"].values():      # FastAPI's 422 is answered as OpenAI's 400 here
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = add_request_schemas(spec, [ChatCompletionRequest, CompletionRequest],
                                                     llm.model.cfg.vocab_size, llm.engine.max_batch)
        return app.openapi_schema
    app.openapi = openapi

    def error_response(e: ApiError, headers: dict | None = None):
        headers = {**({"WWW-Authenticate": "Bearer"} if e.status == 401 else {}), **(headers or {})}
        return JSONResponse(e.body(), status_code=e.status, headers=headers or None)

    @app.exception_handler(ApiError)
    async def on_api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, e: RequestValidationError):     # FastAPI's 422 -> OpenAI's 400
        err = (e.errors() or [{}])[0]
        param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return error_response(ApiError(400, err.get("msg", "invalid request"), param, "invalid_value"))

    @app.exception_handler(HTTPException)
    async def on_http_error(request, e: HTTPException):                    # 404 route, 405 method, ...
        # keep the exception's headers: a 405 must say which methods are allowed (`Allow`, RFC 9110)
        return error_response(ApiError(e.status_code, str(e.detail), None, None), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(request, e: Exception):
        return error_response(ApiError(500, f"internal server error: {type(e).__name__}: {e}"))

    async def auth(request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        # the auth scheme is case-insensitive (RFC 9110 11.1): "bearer KEY" is as good as "Bearer KEY"
        if api_key is not None and not (scheme.lower() == "bearer" and
                                        hmac.compare_digest(token.strip().encode(), api_key.encode())):
            raise ApiError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'.",
                           None, "invalid_api_key")

    limits = limits or Limits()
    max_chars = llm.engine.max_len * longest_token_chars(llm.tokenizer) if llm.tokenizer is not None else None

    async def read_limited(request: Request) -> bytes:
        """The body, refused with 413 as soon as it passes the limit (declared or streamed)."""
        too_big = ApiError(413, f"The request body is larger than this server's limit of {limits.max_body_bytes:,} "
                                "bytes (nanoseek serve --max-body-mb).", None, "request_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def json_body(request: Request) -> dict:
        try:
            body = json.loads(await read_limited(request))
        except (ValueError, RecursionError) as e:     # JSONDecodeError, bad UTF-8, absurd nesting
            raise ApiError(400, f"We could not parse the JSON body of your request ({e}). Send a JSON object "
                                "with Content-Type: application/json.", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.", None, "invalid_json")
        model = field(body, "model", str)
        if model is not None and model != model_name:
            raise ApiError(404, f"The model {model!r} does not exist: this server serves '{model_name}'.",
                           "model", "model_not_found")
        return body

    card = {"id": model_name, "object": "model", "created": started, "owned_by": "nanoseek",
            "max_model_len": llm.engine.max_len}

    page = (Path(__file__).with_name("chat.html")).read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def chat_page():                # a chat page: open http://HOST:PORT/ in a browser
        return HTMLResponse(page)

    @app.get("/health", responses=responses(Health, 503))
    async def health():
        if not worker.alive:
            raise ApiError(503, worker.error or "the engine thread is not running")
        return {"status": "ok", "model": model_name, "running": len(worker.jobs), **worker.stats}

    metrics = Metrics()

    scoring = asyncio.Semaphore(1)

    async def measured(endpoint: str, handle):
        """Run a request handler, counting its status and the time to its response's start - for a stream,
        its first chunk. (Not an HTTP middleware: Starlette's would hide a client's disconnect from the
        handler.)"""
        t0 = time.perf_counter()
        try:
            response = await handle()
        except ApiError as e:
            metrics.observe(endpoint, e.status, time.perf_counter() - t0)
            raise
        except Exception:
            metrics.observe(endpoint, 500, time.perf_counter() - t0)
            raise
        if not isinstance(response, StreamingResponse):
            metrics.observe(endpoint, response.status_code, time.perf_counter() - t0)
            return response
        body = response.body_iterator

        async def timed():              # a stream's response starts with its first chunk, not at setup
            seen = False
            try:
                async for part in body:
                    if not seen:
                        seen = True
                        metrics.observe(endpoint, response.status_code, time.perf_counter() - t0)
                    yield part
            finally:
                if not seen:            # the client left (or the stream ended) before any byte
                    metrics.observe(endpoint, response.status_code, time.perf_counter() - t0)
                await body.aclose()     # the handler's stream(): its finally aborts unfinished work
        response.body_iterator = timed()
        return response

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(worker, llm.engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[Depends(auth)], responses=responses(ModelList, 401))
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(auth)], responses=responses(ModelCard, 401, 404))
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"The model '{model_id}' does not exist.", "model", "model_not_found")
        return card

    def within_budget(p: Parsed) -> Parsed:
        asked = p.params.n * len(p.prompts) * p.params.max_tokens
        if asked > limits.max_request_tokens:
            raise ApiError(400, f"This request asks for up to {asked:,} generated tokens (n x prompts x max_tokens); "
                                f"the server's limit is {limits.max_request_tokens:,} per request "
                                "(nanoseek serve --max-request-tokens): lower max_tokens or n, or split it.",
                           "max_tokens", "request_too_large")
        return p

    # parsing tokenizes: off the event loop, so a large prompt never stalls /health or the streams
    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], openapi_extra=request_body(ChatCompletionRequest),
              responses=responses(ChatCompletion, 400, 401, 404, 413, 500, 503, stream=True))
    async def chat_completions(request: Request):
        async def handle():
            body = await json_body(request)
            parsed = await asyncio.to_thread(parse_chat, body, llm, max_chars)
            return await respond(request, within_budget(parsed), chat=True)
        return await measured("chat", handle)

    @app.post("/v1/completions", dependencies=[Depends(auth)], openapi_extra=request_body(CompletionRequest),
              responses=responses(Completion, 400, 401, 404, 413, 500, 503, stream=True))
    async def completions(request: Request):
        async def handle():
            body = await json_body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) > limits.max_prompts and not is_token_ids(prompt):
                raise ApiError(400, f"'prompt' holds {len(prompt):,} prompts; at most {limits.max_prompts:,} per "
                                    "request.", "prompt", "too_many_prompts")
            parsed = await asyncio.to_thread(parse_completion, body, llm, max_chars)
            return await respond(request, within_budget(parsed), chat=False)
        return await measured("completions", handle)

    async def respond(request, p: Parsed, chat: bool):
        """Run a parsed request's jobs on the engine thread; the ResponseBuilder shapes what comes back."""
        worker.check_alive()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        loop, events, n = asyncio.get_running_loop(), asyncio.Queue(), p.params.n
        jobs = [Job(rid if len(p.prompts) == 1 else f"{rid}-{k}", ids, p.params, k * n, llm, loop, events, p.param)
                for k, ids in enumerate(p.prompts)] if p.generate else []
        echoed = None
        if p.echo and p.params.logprobs is not None:
            async with scoring:               # one prompt-scoring forward at a time, in the engine's precision
                echoed = await asyncio.to_thread(llm.prompt_logprobs, p.prompts, p.params.logprobs)
        out = ResponseBuilder(p, chat, rid, model_name, llm.tokenizer, byte_of, echoed)

        def abort_unfinished() -> None:
            if not out.finished:
                worker.abort([job.rid for job in jobs])       # one message: O(this request's own jobs)

        async def run(request=None):
            """Submit the jobs, yield Deltas (added to `out`) until every choice has finished. With
            `request` (not streaming: nothing notices a hang-up for us), also check about every second
            that the client is still there."""
            for job in jobs:
                worker.submit(job)
            checked = time.monotonic()
            while not out.finished:
                ev = await next_event(events, worker, request)
                out.add(ev)
                yield ev
                if request is not None and time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise ApiError(499, "the client closed the connection")

        if not p.stream:
            try:
                async for _ in run(request):
                    pass
            finally:
                abort_unfinished()
            metrics.add_tokens(out.usage())
            return JSONResponse(out.to_json())

        async def stream():
            try:
                async for ev in run():
                    for line in out.chunks(ev):
                        yield line
                metrics.add_tokens(out.usage())
                for line in out.tail():
                    yield line
            except ApiError as e:             # headers are sent: report in-band, as OpenAI does
                yield sse(e.body())
            finally:
                abort_unfinished()            # also runs when the client disconnects mid-stream
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ------------------------------------------------------------------------------------------------
def listen(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn, so `--port 0` works and the printed URL is the real one. The socket
    keeps getaddrinfo's protocol (IPPROTO_TCP): asyncio sets TCP_NODELAY only on connections accepted
    from such a socket, and without it every response waited ~40 ms for the client's delayed ACK."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


@contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Serve `app` with uvicorn on a background thread (tests, benchmarks, notebooks); yields its base URL
    and stops the server on exit."""
    import threading

    import uvicorn
    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


def profile_run(llm) -> None:
    """A full batch before serving (as vLLM's profile run): the first full prefill and decode steps build
    state that then stays - the runner's derived weights for the largest batch, the kernels of its shapes
    - so the footprint a server reaches under load is its footprint at start-up."""
    from .sampling import SamplingParams
    eng = llm.engine
    T = max(2, min(eng.max_len // 4, 8192 // eng.max_batch))
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(2, llm.model.cfg.vocab_size, (T,), generator=g).tolist()}
               for _ in range(eng.max_batch)]
    llm.generate(prompts, SamplingParams(temperature=1.0, max_tokens=min(16, eng.max_len - T - 1), ignore_eos=True,
                                         seed=0), use_tqdm=False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek serve", description="OpenAI-compatible HTTP server: "
                                 "/v1/chat/completions, /v1/completions, /v1/models, /health.")
    ap.add_argument("model_dir", help="model directory (config.json, *.safetensors and the tokenizer files)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the server to the network")
    ap.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the /v1 routes")
    ap.add_argument("--model-name", default=None, help="the name clients pass as 'model' (default: the directory's)")
    ap.add_argument("--max-batch", type=int, default=64, help="most sequences decoded together (cache slots)")
    ap.add_argument("--max-len", type=int, default=None,
                    help="context length, prompt + completion (default: min(2048, the model's))")
    ap.add_argument("--kv-cache-dtype", default=None, choices=["auto", "fp8", "bfloat16", "float16", "float32"],
                    help="latent cache dtype; fp8 halves the cache of bf16 (default: the compute dtype)")
    ap.add_argument("--speculative", action="store_true", help="MTP speculative decoding for all-greedy batches")
    ap.add_argument("--no-compile", action="store_true", help="run the decode step eagerly. By default it is "
                    "compiled at start-up for every batch size up to --max-batch (powers of two; the first time "
                    "on a machine ~20 s each on 2 CPU cores, seconds once torch has cached them)")
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)   # the default now; kept for old scripts
    ap.add_argument("--dtype", default=None, help="weight dtype: float32, bfloat16, float16 (default: as saved)")
    ap.add_argument("--weights", default=None, choices=["fp8"], help="fp8: hold the block linears and experts as "
                    "e4m3 + 128x128 block scales (half the memory of bf16; decode runs eagerly)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    ap.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ap.add_argument("--max-body-mb", type=float, default=8.0, help="largest request body accepted (413 beyond)")
    ap.add_argument("--max-request-tokens", type=int, default=1 << 20,
                    help="most tokens one request may ask to generate: n x prompts x max_tokens")
    args = ap.parse_args(argv)
    if args.max_batch < 1:
        raise UserError(f"--max-batch {args.max_batch}: must be >= 1")
    from .cli import load_llm                 # cli imports this module's streaming pieces
    llm = load_llm(args.model_dir, need_tokenizer=False, max_batch=args.max_batch, max_len=args.max_len,
                   kv_cache_dtype=args.kv_cache_dtype, speculative=args.speculative, dtype=args.dtype,
                   device=args.device, compile=False if args.no_compile else "auto", weights=args.weights)
    # as vLLM captures its graphs: every batch bucket, before serving. On CPU only: inductor keeps its CUDA
    # graphs per thread, and requests decode on the engine worker's thread, so on CUDA the buckets are
    # compiled and captured there, by the compile policy, on first use
    if not args.no_compile and llm.engine.runner.device.type == "cpu":
        llm.engine.runner.warmup()
        if llm.engine.speculative:
            from .speculative import SPEC_MAX_ROWS
            llm.engine.runner.warmup([b for b in (1, 2, 4) if b <= SPEC_MAX_ROWS], spec=True,
                                     desc="compiling speculative decode")
    profile_run(llm)
    name = args.model_name or Path(args.model_dir).resolve().name
    if args.max_body_mb <= 0 or args.max_request_tokens < 1:
        raise UserError("--max-body-mb and --max-request-tokens must be positive")
    app = build_app(llm, name, args.api_key, Limits(max_body_bytes=int(args.max_body_mb * 2**20),
                                                  max_request_tokens=args.max_request_tokens))
    import uvicorn
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    print(f"nanoseek serve: model '{name}' ({llm.model.device}, batch {args.max_batch}, context "
          f"{llm.engine.max_len}) at http://{f'[{host}]' if ':' in host else host}:{port}/v1", flush=True)
    if llm.tokenizer is None:
        print("nanoseek serve: warning: no tokenizer in the model directory; only token-id completions work",
              file=sys.stderr, flush=True)
    if host not in ("127.0.0.1", "::1") and args.api_key is None:
        print(f"nanoseek serve: warning: listening on {host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=args.log_level)).run(sockets=[sock])
