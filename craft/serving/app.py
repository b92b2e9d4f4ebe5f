"""The HTTP application: OpenAI-compatible routes on Starlette.

    GET  /health               {"status": "ok", ...} (no key needed)
    GET  /v1/models            the one model served
    POST /v1/completions       prompt (a string or a list of strings) -> text
    POST /v1/chat/completions  messages -> the assistant's reply (needs a chat template)

Every error is OpenAI error JSON (`{"error": {"message", "type", "param", "code"}}`) with its
HTTP status: 400 bad request (invalid JSON, wrong types, unsupported or out-of-range values, a
prompt longer than the context), 401 missing or wrong API key, 404 unknown model or route,
405 wrong method, 413 body over the limit, 503 queue full (with Retry-After), 500 a fault.
Nothing from a request reaches a file path, a module name or a shell.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from craft.errors import TokenizerError
from craft.serving import protocol as P
from craft.serving.chat import render
from craft.serving.engine_process import EngineProcess
from craft.serving.trace import Marks, Tracer
from craft.serving.worker import BatchWorker, Event, Job

log = logging.getLogger("craft.serving")

MAX_BODY_BYTES = 1 << 20


@dataclass
class ServerState:
    """What the routes need: the worker, the tokenizer and the limits."""

    worker: BatchWorker | EngineProcess  # the model's decoding, here or in its own process
    tokenizer: Any
    model_name: str
    context: int | None  # the model's block_size (None: unbounded)
    max_tokens_limit: int
    default_max_tokens: int
    api_key: str | None = None
    chat_template: Any = None  # compiled jinja2 template or None
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = 0
    tracer: Tracer | None = None  # CRAFT_SERVE_TRACE: per-request timestamps


def error_response(e: P.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------------------ request helpers


def _authorize(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), state.api_key.encode()
    )
    if not ok:
        raise P.ApiError(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _body(state: ServerState, request: Request) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
        raise P.ApiError(413, f"request body over {state.max_body_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > state.max_body_bytes:
            raise P.ApiError(413, f"request body over {state.max_body_bytes} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise P.ApiError(400, f"the request body is not valid JSON: {e}") from None


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise P.ApiError(
            404,
            f"model {name!r} does not exist; this server serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _encode(state: ServerState, text: str, param: str) -> list[int]:
    from craft.generation import encode_prompt

    try:
        ids = encode_prompt(state.tokenizer, text)
    except TokenizerError as e:
        msg = e.message.removeprefix("prompt: ")
        raise P.ApiError(400, f"{param}: {msg}", param=param) from None
    if state.context is not None and len(ids) > state.context:
        raise P.ApiError(
            400,
            f"{param}: {len(ids)} tokens, more than the model's context of {state.context}",
            param=param,
            code="context_length_exceeded",
        )
    return ids


def _job(state: ServerState, req: P._Sampling, prompts: list[list[int]], max_tokens: int | None):
    from craft.sampling import SamplingParams

    n_max = state.worker.max_batch_size
    if req.n * len(prompts) > n_max:
        raise P.ApiError(
            400,
            f"n: {req.n} x {len(prompts)} prompt(s) exceeds the batch size of {n_max}",
            param="n",
        )
    limit = state.max_tokens_limit
    tokens = state.default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= tokens <= limit:
        raise P.ApiError(400, f"max_tokens: {tokens}; expected 1..{limit}", param="max_tokens")
    sampling = SamplingParams(req.temperature, req.top_k, None if req.top_p >= 1.0 else req.top_p)
    return Job(
        prompts=prompts,
        n=req.n,
        sampling=sampling,
        max_tokens=tokens,
        seed=req.seed,
        stops=req.stops(),
        loop=asyncio.get_running_loop(),
    )


def _submit(state: ServerState, job: Job, entered: float) -> None:
    if state.tracer is not None:
        job.marks = Marks(enter=entered)
        job.mark("submit", work_submit=state.worker.work)
    dead = getattr(state.worker, "dead", None)
    if dead:
        raise P.ApiError(
            503,
            f"the model is not available ({dead}); the server must be restarted",
            type="server_error",
            code="engine_unavailable",
        )
    if not state.worker.submit(job):
        raise P.ApiError(
            503,
            "the server is at capacity (request queue full); retry shortly",
            type="server_overloaded",
            code="queue_full",
            headers={"Retry-After": "1"},
        )


async def _watch_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(state: ServerState, request: Request, job: Job) -> tuple[list, int] | None:
    """Wait for every choice of a non-streamed job; None (job cancelled) if the client left."""
    texts = [[""] * 1 for _ in range(job.size)]
    finish: list[str | None] = [None] * job.size
    tokens = [0] * job.size
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        while any(f is None for f in finish):
            getter = asyncio.ensure_future(job.queue.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                state.worker.cancel(job)
                return None
            item = getter.result()
            if isinstance(item, BaseException):
                raise item
            for ev in item:
                texts[ev.index].append(ev.text)
                if ev.finish is not None:
                    finish[ev.index], tokens[ev.index] = ev.finish, ev.completion_tokens
    finally:
        watcher.cancel()
    return [("".join(t), f) for t, f in zip(texts, finish, strict=True)], sum(tokens)


async def _events(state: ServerState, job: Job) -> AsyncIterator[list[Event]]:
    """The job's events until every choice finished; cancels the job if the stream is dropped."""
    left = job.size
    try:
        while left:
            item = await job.queue.get()
            if isinstance(item, BaseException):
                raise item
            left -= sum(ev.finish is not None for ev in item)
            yield item
    finally:
        if left:
            state.worker.cancel(job)


def _sse(obj: dict[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def _stream(
    state: ServerState,
    job: Job,
    chunks: Any,
    rid: str,
    include_usage: bool,
    obj: str,
    prompt_tokens: int,
) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        total = 0
        try:
            for start in chunks.start(job.size):
                yield _sse(start)
            async for evs in _events(state, job):
                for ev in evs:
                    if ev.text:
                        job.mark("received")
                        yield _sse(chunks.text(ev.index, ev.text))
                        job.mark("written")
                    if ev.finish is not None:
                        total += ev.completion_tokens
                        yield _sse(chunks.finish(ev.index, ev.finish))
            if include_usage:
                yield _sse(P.usage_chunk(rid, state.model_name, obj, prompt_tokens, total))
        except Exception as e:  # headers are sent: report the fault in the stream
            log.exception("request %s failed", rid)
            err = P.ApiError(500, f"generation failed: {type(e).__name__}", type="server_error")
            yield _sse(err.body())
        yield _sse("[DONE]")
        if state.tracer is not None and job.marks is not None:
            state.tracer.write({"id": rid, **job.marks})

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class _CompletionChunks:
    def __init__(self, rid: str, model: str) -> None:
        self.rid, self.model = rid, model

    def start(self, n: int) -> list[dict[str, Any]]:
        return []

    def text(self, index: int, text: str) -> dict[str, Any]:
        return P.completion_chunk(self.rid, self.model, index, text, None)

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return P.completion_chunk(self.rid, self.model, index, "", reason)


class _ChatChunks(_CompletionChunks):
    def start(self, n: int) -> list[dict[str, Any]]:
        return [
            P.chat_chunk(self.rid, self.model, i, {"role": "assistant"}, None) for i in range(n)
        ]

    def text(self, index: int, text: str) -> dict[str, Any]:
        return P.chat_chunk(self.rid, self.model, index, {"content": text}, None)

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return P.chat_chunk(self.rid, self.model, index, {}, reason)


# ------------------------------------------------------------------------------------- routes


def build_app(state: ServerState) -> Starlette:
    """The Starlette app over a started `BatchWorker`."""
    state.created = state.created or int(time.time())

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": state.model_name, **state.worker.load})

    async def models(request: Request) -> Response:
        _authorize(state, request)
        card = {
            "id": state.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "craft",
            "max_model_len": state.context,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def completions(request: Request) -> Response:
        entered = time.perf_counter()
        _authorize(state, request)
        req = P.parse(P.CompletionRequest, await _body(state, request))
        _check_model(state, req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise P.ApiError(400, "prompt: expected a string or a non-empty list", param="prompt")
        prompts = [_encode(state, t, "prompt") for t in texts]
        job = _job(state, req, prompts, req.max_tokens)
        rid = P.new_id("cmpl")
        prompt_tokens = sum(len(p) for p in prompts)
        _submit(state, job, entered)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            chunks = _CompletionChunks(rid, state.model_name)
            return _stream(state, job, chunks, rid, usage, "text_completion", prompt_tokens)
        result = await _collect(state, request, job)
        if result is None:
            return Response(status_code=499)  # the client closed the connection: nobody reads it
        choices, completion_tokens = result
        return JSONResponse(
            P.completion(rid, state.model_name, choices, prompt_tokens, completion_tokens)
        )

    async def chat(request: Request) -> Response:
        entered = time.perf_counter()
        _authorize(state, request)
        req = P.parse(P.ChatRequest, await _body(state, request))
        _check_model(state, req.model)
        if state.chat_template is None:
            raise P.ApiError(
                400,
                f"model {state.model_name!r} has no chat template; use /v1/completions, or start "
                "the server with --chat-template FILE",
                param="messages",
                code="no_chat_template",
            )
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        text = render(state.chat_template, messages, state.tokenizer, req.add_generation_prompt)
        prompt = _encode(state, text, "messages")
        max_tokens = req.max_tokens
        if req.max_completion_tokens is not None:
            max_tokens = req.max_completion_tokens
        job = _job(state, req, [prompt], max_tokens)
        rid = P.new_id("chatcmpl")
        _submit(state, job, entered)
        if req.stream:
            usage = req.stream_options is not None and req.stream_options.include_usage
            chunks = _ChatChunks(rid, state.model_name)
            return _stream(state, job, chunks, rid, usage, "chat.completion.chunk", len(prompt))
        result = await _collect(state, request, job)
        if result is None:
            return Response(status_code=499)
        choices, completion_tokens = result
        return JSONResponse(
            P.chat_completion(rid, state.model_name, choices, len(prompt), completion_tokens)
        )

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, P.ApiError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kinds = {404: "not_found", 405: "method_not_allowed"}
        err = P.ApiError(
            exc.status_code,
            f"{request.method} {request.url.path}: {exc.detail}",
            code=kinds.get(exc.status_code),
        )
        return error_response(err)

    async def fault(request: Request, exc: Exception) -> Response:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        err = P.ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return error_response(err)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={P.ApiError: api_error, HTTPException: http_error, Exception: fault},
    )
