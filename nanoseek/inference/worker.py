"""The engine thread behind the HTTP server.

One `EngineWorker` thread is the ONLY caller of engine.add_request / step / abort (the engine is not
thread safe, and continuous batching wants every live request inside the same `step()`). Handlers
submit jobs through a thread-safe queue; the worker drains it before each step, so requests that
arrive while a step runs join the batch at the next one, and it blocks on the queue when idle.
Events go back per request through `loop.call_soon_threadsafe(asyncio.Queue.put_nowait, ...)`.
A request that fails in the worker fails only itself; an exception in `step()` fails that batch's
requests and the worker goes on; if the worker dies, waiting and later requests get a 500.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import dataclasses
import functools
import queue
import threading
import traceback

from ..common import UserError
from .sampling import SamplingParams
from .stream import TextStream


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Delta:
    """One event for a handler: what one sequence produced since the last event."""
    index: int                           # choice index in the response
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finish_reason: str | None


class Job:
    """One engine request (n sequences) and the asyncio queue its handler reads."""

    def __init__(self, rid: str, prompt_ids: list[int], params: SamplingParams, first_index: int,
                 llm, loop: asyncio.AbstractEventLoop, events: asyncio.Queue, param: str = "prompt"):
        self.rid, self.prompt_ids, self.params, self.first_index = rid, prompt_ids, params, first_index
        self.param = param               # the request field to blame if the engine rejects the prompt
        self.loop, self.events = loop, events
        decode = functools.partial(llm.decode, skip_special_tokens=params.skip_special_tokens)
        self.streams = [TextStream(decode, params.stop) for _ in range(params.n)]
        self.reported = [0] * params.n   # tokens already sent, per sequence
        self.done: set[int] = set()

    def send(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:             # the handler's event loop is closed: nobody is listening
            pass

    def emit(self, s, llm) -> None:
        k = self.reported[s.index]
        self.reported[s.index] = len(s.out_ids)
        stream = self.streams[s.index]
        text = stream.finish(llm.to_output(s).text) if s.finish_reason else stream.update(s.out_ids)
        self.send(Delta(self.first_index + s.index, text, s.out_ids[k:], s.logprobs[k:], s.top_logprobs[k:],
                        s.finish_reason))
        if s.finish_reason:
            self.done.add(s.index)


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere: gives the free memory in glibc's arenas (one per thread
    that allocated) back to the OS. After a burst of large requests it returned ~30 MB of 626
    (benchmarks/serve_limits.py); most of a first burst's growth was state that stays (see serve's
    profile run)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


class EngineWorker:
    """Owns `llm.engine` on one thread; handlers talk to it only through `submit` and `abort`."""

    def __init__(self, llm):
        self.llm = llm
        self.inbox: queue.Queue = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.error: str | None = None    # set when the thread ends: why new requests are refused
        self.error_status = 500
        self.stats = {"requests": 0, "finished": 0, "aborted": 0, "failed": 0}
        self.thread: threading.Thread | None = None
        self._trim = _malloc_trim()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.thread is not None:
            self.inbox.put(None)
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self.error is None

    def check_alive(self) -> None:
        if not self.alive:
            raise ApiError(self.error_status, self.error or "the engine thread is not running (server starting?)")

    def submit(self, job: Job) -> None:
        self.check_alive()
        self.inbox.put(("add", job))

    def abort(self, rids: list[str]) -> None:
        self.inbox.put(("abort", rids))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            self._loop()
            self.error, self.error_status = "the server is shutting down", 503
        except BaseException as e:       # whatever killed us, tell every waiting client
            traceback.print_exc()
            self.error = f"the engine thread stopped: {type(e).__name__}: {e}"
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[0] == "add":
                self.jobs[item[1].rid] = item[1]
        for job in list(self.jobs.values()):
            job.send(ApiError(self.error_status, self.error))
        self.jobs.clear()

    IDLE_TIDY_S = 1.0   # after work, give memory back once the inbox has been quiet this long

    def _loop(self) -> None:
        eng = self.llm.engine
        untidy = False                    # work has run since memory was last given back
        while True:
            try:                          # idle: block, with a deadline once there is tidying to do
                item = self.inbox.get_nowait() if eng.has_work() else \
                    self.inbox.get(timeout=self.IDLE_TIDY_S if untidy else None)
            except queue.Empty:
                if not eng.has_work():    # quiet for a second: no request waits on the GIL meanwhile
                    self._tidy()
                    untidy = False
                    continue
            else:
                if not self._drain(item):
                    return
            if eng.has_work():
                untidy = True
                self._step()

    def _drain(self, item) -> bool:
        """Handle `item` and all else waiting in the inbox, before the next step; False on shutdown."""
        while item is not None:
            self._handle(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return True
        return False

    def _tidy(self) -> None:
        """The finished requests' cycles (jobs <-> streams), then glibc's free arenas, back to the OS."""
        import gc
        gc.collect()
        if self._trim is not None:
            self._trim(0)

    def _handle(self, op: str, arg) -> None:
        eng = self.llm.engine
        if op == "abort":
            live = [rid for rid in arg if self.jobs.pop(rid, None) is not None]
            if live:
                eng.abort(live)
                self.stats["aborted"] += len(live)
            return
        job: Job = arg
        try:
            eng.add_request(job.prompt_ids, job.params, job.rid)
        except UserError as e:
            job.send(ApiError(400, str(e), job.param))
            return
        except Exception as e:            # fail this request only
            traceback.print_exc()
            job.send(ApiError(500, f"the engine rejected the request: {type(e).__name__}: {e}"))
            return
        self.jobs[job.rid] = job
        self.stats["requests"] += 1

    def _fail(self, job: Job, err: ApiError) -> None:
        job.send(err)
        self.jobs.pop(job.rid, None)
        self.stats["failed"] += 1
        try:
            self.llm.engine.abort(job.rid)
        except Exception:                 # the request is failed either way
            traceback.print_exc()

    def _step(self) -> None:
        eng = self.llm.engine
        try:
            seqs = eng.step()
        except Exception as e:            # fail this batch, keep serving
            traceback.print_exc()
            for job in list(self.jobs.values()):
                self._fail(job, ApiError(500, f"the engine failed on this batch: {type(e).__name__}: {e}"))
            return
        for s in seqs:
            job = self.jobs.get(s.request_id)
            if job is None or s.index in job.done:
                continue
            try:
                self.llm.check_stop_strings(s)
                job.emit(s, self.llm)
            except Exception as e:        # fail this request only
                traceback.print_exc()
                self._fail(job, ApiError(500, f"failed to produce this request's text: {type(e).__name__}: {e}"))
                continue
            if len(job.done) == job.params.n:
                del self.jobs[job.rid]
                self.stats["finished"] += 1


async def next_event(events: asyncio.Queue, worker: EngineWorker, request=None) -> Delta:
    """The next Delta for this handler; raises the ApiError the worker sent, or a 500 if it died.
    One waiting task is reused across timeouts so an event can never be lost to a cancellation."""
    getter = asyncio.ensure_future(events.get())
    try:
        while not (await asyncio.wait({getter}, timeout=1.0))[0]:
            worker.check_alive()
            if request is not None and await request.is_disconnected():
                raise ApiError(499, "the client closed the connection")
    finally:
        if not getter.done():
            getter.cancel()
    ev = getter.result()
    if isinstance(ev, ApiError):
        raise ev
    return ev
