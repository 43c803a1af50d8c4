"""OpenAI-compatible REST server (FastAPI + uvicorn) over :class:`~.api.AsyncMLCEngine`.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (JSON, or server-sent events
ending with ``data: [DONE]`` when ``stream`` is true), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). Errors use OpenAI's shape ``{"error": {message, type, param, code}}``:
400 for invalid values (a schema or grammar that does not compile, clashing tool names, a tool_choice
naming no tool) and context overflow, 401 for a bad API key, 404 for unknown models and routes,
422 for valid requests asking for something unsupported. A client that disconnects aborts its
request, which frees its KV-cache pages.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import protocol as p
from .api import AsyncMLCEngine, EngineError
from .conversation import TemplateError
from .engine import ContextWindowError

logger = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.2


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
    ):
        metric(f"mlcbuild_{key}_total", kind, help_text, [(label, stats[key])])
    for key, help_text in (
        ("running", "Requests decoding now."),
        ("prefilling", "Requests whose prompt is being prefilled."),
        ("queued", "Requests waiting for a batch slot or KV-cache pages."),
        ("kv_pages_in_use", "KV-cache pages held by sequences."),
        ("kv_pages_total", "KV-cache pages in the engine."),
    ):
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
# The app
# ----------------------------------------------------------------------------------------------


def create_app(engine: AsyncMLCEngine, api_key: str | None = None, model_aliases: tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app serving ``engine``. ``model_aliases``: other names accepted in ``model``."""
    app = FastAPI(title="mlcbuild", docs_url=None, redoc_url=None, openapi_url=None)
    served = {engine.model, *model_aliases}
    http_counts: Counter = Counter()

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
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(exc.status_code, str(exc.detail), kind)

    @app.middleware("http")
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
        try:
            result = await create(_request=request)
        except ContextWindowError as exc:
            param = "prompt" if exc.param == "messages" and isinstance(request, p.CompletionRequest) else exc.param
            raise APIError(400, str(exc), param=param, code=exc.code) from None
        except p.RequestError as exc:
            raise APIError(exc.status, str(exc), param=exc.param, code=exc.code) from None
        except TemplateError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_messages") from None
        if request.stream:
            return StreamingResponse(sse(result), media_type="text/event-stream",
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
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(engine.stats(), http_counts, engine.model),
                                 media_type="text/plain; version=0.0.4")

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


async def sse(chunks: AsyncIterator[Any]) -> AsyncIterator[str]:
    """Server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json()}\n\n"
    except EngineError as exc:
        body = p.ErrorResponse(error=p.ErrorInfo(message=str(exc), type="server_error"))
        yield f"data: {body.model_dump_json()}\n\n"
    finally:
        await chunks.aclose()  # aborts the request if the client went away mid-stream
    yield "data: [DONE]\n\n"


def _warm_grammars(engine: AsyncMLCEngine) -> None:
    try:
        engine.frontend.warm_grammars()
    except Exception:  # structured output will fail per request, with the reason; plain serving goes on
        logger.exception("could not load xgrammar; structured output is unavailable")


def serve(bundle_or_recipe: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          device: str = "auto", **engine_options: Any) -> None:
    """Run the OpenAI-compatible server until interrupted (``mlcbuild serve``).

    ``engine_options`` go to :class:`~.api.AsyncMLCEngine` (max_batch_size, context_window_size,
    prefill_chunk_size, kv_cache_tokens, conv_template, verify, quantization).
    """
    import uvicorn

    engine = AsyncMLCEngine(bundle_or_recipe, device, **engine_options)
    # xgrammar (with torch) loads in seconds: do it while the server starts, not on the first constrained request
    threading.Thread(target=_warm_grammars, args=(engine,), name="mlcbuild-warm-grammars", daemon=True).start()
    aliases = (str(bundle_or_recipe), Path(bundle_or_recipe).name, Path(bundle_or_recipe).stem)
    app = create_app(engine, api_key=api_key, model_aliases=aliases)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.terminate()
