"""OpenAI-compatible REST server (FastAPI + uvicorn) over :class:`~.api.AsyncMLCEngine`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events
ending with ``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). Errors use OpenAI's shape ``{"error": {message, type, param, code}}``:
400 for invalid values (a schema or grammar that does not compile, clashing tool names, a tool_choice
naming no tool) and context overflow, 401 for a bad API key, 404 for unknown models and routes,
413 for a body over ``max_body_bytes``, 422 for valid requests asking for something unsupported,
429 (``rate_limit_exceeded``) when ``max_queue`` requests already wait beyond the running batch,
500 when generation fails in the engine, 503 when the engine is not running, 504 when a request
runs past ``request_timeout`` (its generation is stopped; a stream ends with an error event).
A client that disconnects aborts its request, which frees its KV-cache pages.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import protocol as p
from .api import AsyncMLCEngine, EngineError
from .conversation import TemplateError
from .engine import ContextWindowError, EngineClosedError

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2
# A 128k-token context is ~0.5 MB of text (or of token ids as JSON): 4 MiB leaves room for long histories
# while a client cannot make the server buffer and parse arbitrarily large bodies.
DEFAULT_MAX_BODY_BYTES = 4 << 20
GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = p.ErrorResponse(error=p.ErrorInfo(message=message, type=type, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[A-Za-z_]*\[.*\]|function-.*)$")


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location (``("body", "messages", 0, "role")``) as OpenAI's param (``messages[0].role``);
    the names pydantic adds for union members (``str``, ``list[int]``) are dropped."""
    text = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not _TYPE_TAG.match(str(part)):
            text += ("." if text else "") + str(part)
    return text or None


def _validation_message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    param = _validation_param(tuple(err.get("loc", ())))
    if err.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {err.get('ctx', {}).get('error', msg)}"
    return f"{msg} - '{param}'" if param else msg


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def prometheus_text(stats: dict[str, Any], http: Counter, model: str) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    label = f'{{model="{model}"}}'
    for key, kind, help_text in (
        ("requests", "counter", "Generation requests submitted to the engine."),
        ("finished", "counter", "Requests that completed."),
        ("aborted", "counter", "Requests cancelled (client went away or aborted)."),
        ("failed", "counter", "Requests that failed in the engine."),
        ("prompt_tokens", "counter", "Prompt tokens prefilled."),
        ("completion_tokens", "counter", "Tokens generated."),
        ("decode_steps", "counter", "Batched decode steps run."),
        ("decode_sequences", "counter", "Sequences advanced by decode steps (sum of batch sizes)."),
        ("prefill_steps", "counter", "Prefill calls run."),
        ("prefix_cache_hit_tokens", "counter", "Prompt tokens reused from the prefix cache (not prefilled)."),
        ("prefix_cache_lookup_tokens", "counter", "Prompt tokens looked up in the prefix cache."),
        ("prefix_cache_evictions", "counter", "Cached sequences evicted to free KV-cache pages."),
        ("preemptions", "counter", "Requests pre-empted (recomputed later) when KV-cache pages ran out."),
        ("spec_draft_tokens", "counter", "Tokens proposed by speculative decoding."),
        ("spec_accepted_tokens", "counter", "Proposed tokens the model accepted."),
    ):
        if key in stats:
            metric(f"mlcbuild_{key}_total", kind, help_text, [(label, stats[key])])
    for key, help_text in (
        ("running", "Requests decoding now."),
        ("prefilling", "Requests whose prompt is being prefilled."),
        ("queued", "Requests waiting for a batch slot or KV-cache pages."),
        ("kv_pages_in_use", "KV-cache pages held by sequences."),
        ("kv_pages_total", "KV-cache pages in the engine."),
        ("kv_pages_cached", "KV-cache pages held only by the prefix cache (freed when needed)."),
        ("prefix_cache_hit_rate", "Share of looked-up prompt tokens found in the prefix cache."),
        ("spec_acceptance_rate", "Share of speculated tokens accepted."),
    ):
        if key in stats:
            metric(f"mlcbuild_{key}", "gauge", help_text, [(label, stats[key])])
    sizes = {int(k): v for k, v in stats["decode_batch_sizes"].items()}
    lines.append("# HELP mlcbuild_decode_batch_size Sequences per decode step.")
    lines.append("# TYPE mlcbuild_decode_batch_size histogram")
    for bound in (*BATCH_BUCKETS, "+Inf"):
        count = sum(v for k, v in sizes.items() if bound == "+Inf" or k <= bound)
        lines.append(f'mlcbuild_decode_batch_size_bucket{{model="{model}",le="{bound}"}} {count}')
    lines.append(f"mlcbuild_decode_batch_size_sum{label} {sum(k * v for k, v in sizes.items())}")
    lines.append(f"mlcbuild_decode_batch_size_count{label} {sum(sizes.values())}")
    metric("mlcbuild_http_requests_total", "counter", "HTTP requests by path and status.",
           [(f'{{path="{path}",status="{status}"}}', n) for (path, status), n in sorted(http.items())])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Admission: the bounded queue
# ----------------------------------------------------------------------------------------------


class InFlight:
    """The count of generation requests in flight, shared by :class:`Admission` and ``/metrics``."""

    count = 0


class Admission:
    """Pure ASGI middleware (a ``BaseHTTPMiddleware`` returns before a stream ends, so it cannot count
    streams) that turns requests away before they cost anything:

    * a body over ``max_body_bytes`` gets 413: from its Content-Length before it is read, or as a
      chunked body grows past the limit (FastAPI's own ``max_body_size`` answers in plain text, not in
      OpenAI's shape, so it is not used);
    * at most ``capacity`` generation requests (the engine's running batch plus ``--max-queue``
      waiting) are in flight, each from its arrival until its response, a whole stream included, is
      complete or its client has gone; the next ones get 429 at once in OpenAI's
      ``rate_limit_exceeded`` shape with ``Retry-After``, instead of queueing without bound.
    """

    def __init__(self, app: ASGIApp, capacity: int | None, max_body_bytes: int | None, in_flight: InFlight):
        self.app = app
        self.capacity = capacity
        self.max_body_bytes = max_body_bytes
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        if limit is not None:
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:
                response = body_too_large(limit)
                response.headers["Connection"] = "close"  # the body is left unread
                await response(scope, receive, send)
                return
            receive = self._limited(receive, limit)
        if scope["method"] != "POST" or scope["path"] not in GENERATION_ROUTES:
            await self.app(scope, receive, send)
            return
        if self.capacity is not None and self.in_flight.count >= self.capacity:
            response = error_response(
                429, f"The server is busy: {self.in_flight.count} requests are in flight, as many as it takes (its "
                "running batch and waiting queue, mlcbuild serve --max-queue); retry later.",
                type="requests", code="rate_limit_exceeded")
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)
            return
        self.in_flight.count += 1  # one event loop: no lock needed
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.count -= 1

    @staticmethod
    def _limited(receive: Receive, limit: int) -> Receive:
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # an HTTPException passes through FastAPI's body reading to the 413 handler in create_app
                    raise StarletteHTTPException(413)
            return message

        return limited_receive


def body_too_large(limit: int | None) -> JSONResponse:
    return error_response(413, f"The request body is larger than this server's limit of {limit} bytes "
                          "(mlcbuild serve --max-body-bytes).", code="request_too_large")


# ----------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------


def create_app(engine: AsyncMLCEngine, api_key: str | None = None, model_aliases: tuple[str, ...] = (), *,
               max_queue: int | None = None, request_timeout: float | None = None,
               max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES, allow_origins: Sequence[str] = ()) -> FastAPI:
    """The FastAPI app serving ``engine``. ``model_aliases``: other names accepted in ``model``.

    ``max_queue``: generation requests that may wait beyond the engine's running batch (more get 429;
    None: unbounded). ``request_timeout``: seconds from arrival after which a request's generation is
    stopped (504, or an error event ending its stream; None: no limit). ``max_body_bytes``: larger
    bodies get 413. ``allow_origins``: browser origins allowed by CORS (``*`` for any; empty: no CORS).
    """
    if max_queue is not None and max_queue < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout}")
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    app = FastAPI(title="mlcbuild", docs_url=None, redoc_url=None, openapi_url=None)
    served = {engine.model, *model_aliases}
    http_counts: Counter = Counter()
    capacity = None if max_queue is None else engine.frontend.engine.max_batch_size + max_queue
    in_flight = InFlight()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, _validation_message(first), code="invalid_json")
        return error_response(400, _validation_message(first), param=_validation_param(tuple(first.get("loc", ()))),
                              code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 413:
            return body_too_large(max_body_bytes)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    # Whatever fails while generating answers in OpenAI's shape, never starlette's plain-text 500.
    @app.exception_handler(EngineError)
    async def _engine_error(_: Request, exc: EngineError) -> JSONResponse:
        return error_response(500, str(exc), "server_error", code="engine_error")

    @app.exception_handler(EngineClosedError)
    async def _engine_closed(_: Request, exc: EngineClosedError) -> JSONResponse:
        return error_response(503, f"The engine is not running: {exc}", "server_error", code="engine_unavailable")

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("request failed", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                              code="internal_error")

    async def _count_and_authorize(request: Request, call_next: Any) -> Response:
        path = request.url.path
        if api_key is not None and path.startswith("/v1/"):
            header = request.headers.get("authorization", "")
            given = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                http_counts[(path if path in ROUTES else "other", 401)] += 1
                return error_response(401, "Incorrect or missing API key. Pass it as 'Authorization: Bearer KEY'.",
                                      code="invalid_api_key")
        response = await call_next(request)
        http_counts[(path if path in ROUTES else "other", response.status_code)] += 1
        return response

    def check_model(model: str | None) -> None:
        if model is not None and model not in served:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{engine.model}'.",
                           param="model", code="model_not_found")

    async def run(request: p.ChatCompletionRequest | p.CompletionRequest, create: Any) -> Response:
        check_model(request.model)
        dead = engine.health()
        if dead is not None:  # a dead engine thread would leave the request waiting forever
            raise APIError(503, f"The engine is not running: {dead}.", "server_error", code="engine_unavailable")
        deadline = None if request_timeout is None else time.monotonic() + request_timeout
        try:
            # Prompt rendering and tokenization run in a worker thread (AsyncMLCEngine's create), so a long
            # prompt does not stall the event loop and the other streams.
            with anyio.fail_after(_time_left(deadline)):
                result = await create(_request=request)
        except TimeoutError:
            raise APIError(504, _timeout_message(request_timeout), "timeout_error", code="request_timeout") from None
        except ContextWindowError as exc:
            param = "prompt" if exc.param == "messages" and isinstance(request, p.CompletionRequest) else exc.param
            raise APIError(400, str(exc), param=param, code=exc.code) from None
        except p.RequestError as exc:
            raise APIError(exc.status, str(exc), param=exc.param, code=exc.code) from None
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from None
        if request.stream:
            return StreamingResponse(sse(result, deadline, request_timeout), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(result.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request, request: p.ChatCompletionRequest) -> Response:
        return await watched(http_request, run(request, engine.chat.completions.create))

    @app.post("/v1/completions")
    async def completions(http_request: Request, request: p.CompletionRequest) -> Response:
        return await watched(http_request, run(request, engine.completions.create))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return p.ModelList(data=[p.Model(id=engine.model)]).model_dump()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return p.Model(id=engine.model).model_dump()

    @app.get("/health")
    async def health() -> JSONResponse:
        # 503 tells a load balancer or orchestrator to route elsewhere (or restart us) when the engine is gone
        dead = engine.health()
        if dead is not None:
            return JSONResponse({"status": "dead", "reason": dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = prometheus_text(engine.stats(), http_counts, engine.model)
        text += ("# HELP mlcbuild_http_in_flight Generation requests in flight (running or waiting).\n"
                 "# TYPE mlcbuild_http_in_flight gauge\n"
                 f'mlcbuild_http_in_flight{{model="{engine.model}"}} {in_flight.count}\n')
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # Middleware added last runs first: CORS answers preflights before the API key is asked for, and
    # requests are counted (and turned away with 429) only once authorized.
    app.add_middleware(Admission, capacity=capacity, max_body_bytes=max_body_bytes, in_flight=in_flight)
    app.add_middleware(BaseHTTPMiddleware, dispatch=_count_and_authorize)
    if allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


async def watched(http_request: Request, work: Any) -> Response:
    """Run a handler, cancelling it (and so aborting its generation) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            return task.result()
        if await http_request.is_disconnected():
            task.cancel()
            return Response(status_code=499)


def _time_left(deadline: float | None) -> float | None:
    """Seconds until a ``time.monotonic()`` deadline, as ``anyio.fail_after`` takes them (None: no limit)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _timeout_message(timeout: float | None) -> str:
    return (f"The request did not finish within the server's request timeout of {timeout:g} s "
            "(mlcbuild serve --request-timeout); its generation was stopped.")


async def sse(chunks: AsyncIterator[Any], deadline: float | None = None,
              timeout: float | None = None) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``. An engine failure or the
    request's ``deadline`` (``time.monotonic()``) ends the stream with an error event in OpenAI's shape."""
    error: p.ErrorInfo | None = None
    try:
        while True:
            # The timeout wraps only the wait for the next chunk, never the yield: the cancellation it
            # causes then lands inside the engine stream, whose cleanup aborts the engine request.
            try:
                with anyio.fail_after(_time_left(deadline)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            yield f"data: {chunk.model_dump_json()}\n\n"
    except TimeoutError:
        error = p.ErrorInfo(message=_timeout_message(timeout), type="timeout_error", code="request_timeout")
    except EngineError as exc:
        error = p.ErrorInfo(message=str(exc), type="server_error", code="engine_error")
    finally:
        await chunks.aclose()  # aborts the request if the client went away mid-stream
    if error is not None:
        yield f"data: {p.ErrorResponse(error=error).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


def _warm_grammars(engine: AsyncMLCEngine) -> None:
    try:
        engine.frontend.warm_grammars()
    except Exception:  # structured output will fail per request, with the reason; plain serving goes on
        logger.exception("could not load xgrammar; structured output is unavailable")


# MLC LLM's ``--overrides`` keys (EngineConfig's names) and ours, as the engine options they set.
OVERRIDE_KEYS = {
    "context_window_size": "context_window_size",
    "prefill_chunk_size": "prefill_chunk_size",
    "max_num_sequence": "max_batch_size",
    "max_batch_size": "max_batch_size",
    "max_total_seq_length": "kv_cache_tokens",
    "kv_cache_tokens": "kv_cache_tokens",
    "tensor_parallel_shards": "tensor_parallel_shards",  # the recipe's bundle for that count (sharded_model.py)
}


def parse_overrides(text: str) -> dict[str, int]:
    """MLC LLM's ``--overrides "context_window_size=1024;max_num_sequence=8"`` as engine options
    (``{"context_window_size": 1024, "max_batch_size": 8}``); a ValueError names what is wrong."""
    options: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep:
            raise ValueError(f"--overrides: {item!r} is not KEY=VALUE")
        if key not in OVERRIDE_KEYS:
            raise ValueError(f"--overrides: unknown key {key!r}; known: {', '.join(OVERRIDE_KEYS)}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"--overrides: {key}={value!r} is not an integer") from None
        if number < 1:
            raise ValueError(f"--overrides: {key} must be >= 1, got {number}")
        options[OVERRIDE_KEYS[key]] = number
    return options


def serve(bundle_or_recipe: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", *, max_queue: int | None = None, request_timeout: float | None = None,
          max_body_bytes: int | None = DEFAULT_MAX_BODY_BYTES, allow_origins: Sequence[str] = (),
          **engine_options: Any) -> None:
    """Run the OpenAI-compatible server until interrupted (``mlcbuild serve``).

    ``engine_options`` go to :class:`~.api.AsyncMLCEngine` (max_batch_size, context_window_size,
    prefill_chunk_size, kv_cache_tokens, prefix_cache, speculative_mode, speculative_tokens,
    gpu_memory_utilization, conv_template, verify, quantization); the serving limits
    (``max_queue``, ``request_timeout``, ``max_body_bytes``, ``allow_origins``) to :func:`create_app`.
    """
    import uvicorn

    engine = AsyncMLCEngine(bundle_or_recipe, device, **engine_options)
    # xgrammar (with torch) loads in seconds: do it while the server starts, not on the first constrained request
    threading.Thread(target=_warm_grammars, args=(engine,), name="mlcbuild-warm-grammars", daemon=True).start()
    aliases = (str(bundle_or_recipe), Path(bundle_or_recipe).name, Path(bundle_or_recipe).stem)
    try:
        app = create_app(engine, api_key=api_key, model_aliases=aliases, max_queue=max_queue,
                         request_timeout=request_timeout, max_body_bytes=max_body_bytes, allow_origins=allow_origins)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info",
                                               timeout_graceful_shutdown=5))
        died: list[str] = []
        threading.Thread(target=_watch_engine, args=(engine, server, died), name="mlcbuild-serve-watchdog",
                         daemon=True).start()
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; stopping so is a clean exit (as uvicorn.run)
            pass
    finally:
        engine.terminate()
    if died:
        raise EngineDiedError(f"the engine stopped while serving: {died[0]}")


class EngineDiedError(RuntimeError):
    """``serve`` stopped because its engine can no longer run (``mlcbuild serve`` exits non-zero)."""


def _watch_engine(engine: AsyncMLCEngine, server: Any, died: list[str], interval: float = 0.2) -> None:
    """Stop ``server`` once ``engine`` is dead (its thread died, or a tensor-parallel worker did). Such an
    engine never recovers: a server answering 503 forever would look alive to a process supervisor, which
    restarts a process that exits non-zero. The shutdown is uvicorn's graceful one, so requests in flight
    still get their error responses (or their streams' error events) first."""
    while not server.should_exit:
        reason = engine.health()
        if reason is not None:
            logger.error("the engine stopped (%s); shutting the server down", reason)
            died.append(reason)
            server.should_exit = True
            return
        time.sleep(interval)
