"""The server under load and faults: bounded queue (429), request timeout (504), body limit (413), CORS,
/health of a dead engine, and engine failures as OpenAI error JSON. A real server on 127.0.0.1 and a
real HTTP client; faults are injected into the real engine's compiled model (a slow or failing step)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from runtime_support import ServerThread, tiny, tiny_draft  # noqa: F401 (shared fixtures)
from runtime_support import cli_server as start_cli_server

from mlcbuild import AsyncMLCEngine
from mlcbuild.runtime.server import create_app, parse_overrides

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
ORIGIN = "http://ui.example"


@pytest.fixture(scope="module")
def engine(tiny) -> Iterator[AsyncMLCEngine]:
    engine = AsyncMLCEngine(tiny.recipe)
    yield engine
    engine.terminate()


@pytest.fixture(scope="module")
def limited(engine) -> Iterator[ServerThread]:
    """Queue of 32 beyond the batch, a 64 KiB body limit, CORS for one origin."""
    app = create_app(engine, max_queue=32, max_body_bytes=64 << 10, allow_origins=(ORIGIN,))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture()
def slow_steps(engine) -> Iterator[None]:
    """Every decode step of the engine takes 20 ms longer (a slow model), for as long as the test runs."""
    model = engine.frontend.engine.model
    real = model.forward_decode

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)
        return real(*args, **kwargs)

    model.forward_decode = slow
    yield
    del model.forward_decode  # the class's method again


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def wait_idle(url: str) -> None:
    """Aborts are applied on the engine thread: wait until nothing is running or holds pages."""
    deadline = time.monotonic() + 10
    while (metric(url, "mlcbuild_running") or metric(url, "mlcbuild_kv_pages_in_use")
           or metric(url, "mlcbuild_http_in_flight")):
        assert time.monotonic() < deadline, "the engine did not go idle"
        time.sleep(0.05)


def test_flood_of_200_against_a_queue_of_32(limited, engine):
    """All 200 at once: the excess gets 429 (OpenAI's rate_limit_exceeded), every other one completes."""
    body = {"messages": MESSAGES, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    reference = httpx.post(limited.url + "/v1/chat/completions", json=body, timeout=60).json()
    expected = reference["choices"][0]["message"]["content"]
    capacity = engine.frontend.engine.max_batch_size + 32

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=limited.url, limits=limits, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(200)))

    responses = asyncio.run(flood())
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    assert capacity <= statuses[200] < 200, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests" and "--max-queue" in error[
                "message"]
        else:
            out = r.json()
            assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 48
            assert out["choices"][0]["message"]["content"] == expected  # greedy: each one as served alone
    wait_idle(limited.url)
    text = httpx.get(limited.url + "/metrics").text
    assert f'mlcbuild_http_requests_total{{path="/v1/chat/completions",status="429"}} {statuses[429]}' in text


def test_body_limit_413_and_cors(limited):
    big = {"messages": [{"role": "user", "content": "x" * (70 << 10)}]}
    resp = httpx.post(limited.url + "/v1/chat/completions", json=big)
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert error["code"] == "request_too_large" and "65536 bytes" in error["message"]

    # a chunked body (no Content-Length) is cut off as it grows past the limit
    def chunks() -> Iterator[bytes]:
        yield json.dumps(big).encode()

    resp = httpx.post(limited.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    preflight = httpx.options(limited.url + "/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    resp = httpx.get(limited.url + "/v1/models", headers={"Origin": ORIGIN})
    assert resp.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(limited.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_no_cors_headers_unless_configured(engine):
    with ServerThread(create_app(engine)) as srv:
        resp = httpx.get(srv.url + "/v1/models", headers={"Origin": ORIGIN})
        assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers


def test_request_timeout_stops_generation(engine, slow_steps):
    """A 0.5 s timeout on a request that would take >= 4 s (200 steps of >= 20 ms): 504 in OpenAI's shape
    (or, for a stream, an error event and [DONE]) and the engine request is aborted, its pages freed."""
    with ServerThread(create_app(engine, request_timeout=0.5)) as srv:
        aborted = metric(srv.url, "mlcbuild_aborted_total")
        body = {"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True}
        start = time.monotonic()
        resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 504 and time.monotonic() - start < 3
        error = resp.json()["error"]
        assert error["code"] == "request_timeout" and error["type"] == "timeout_error"
        assert "--request-timeout" in error["message"]

        with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "request_timeout"
        assert any(json.loads(e).get("choices") for e in events[:-2])  # it had streamed some tokens
        wait_idle(srv.url)
        assert metric(srv.url, "mlcbuild_aborted_total") - aborted == 2


def test_engine_failure_is_openai_json_and_dead_engine_is_503(tiny):
    """A failing model step fails the request with a 500 in OpenAI's shape (never a plain-text 500); the
    engine goes on serving; after it is terminated /health and requests answer 503."""
    engine = AsyncMLCEngine(tiny.recipe)
    try:
        with ServerThread(create_app(engine)) as srv:
            model = engine.frontend.engine.model

            def broken(*args: Any, **kwargs: Any) -> Any:
                raise RuntimeError("injected prefill failure")

            model.forward_prefill = broken
            body = {"messages": MESSAGES, "max_tokens": 4}
            resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 500 and resp.headers["content-type"] == "application/json"
            error = resp.json()["error"]
            assert error["type"] == "server_error" and "injected prefill failure" in error["message"]
            with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 4,
                                                                          "stream": True}, timeout=30) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "server_error"
            del model.forward_prefill
            assert httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200
            assert httpx.get(srv.url + "/health").json() == {"status": "ok"}

            engine.terminate()
            health = httpx.get(srv.url + "/health")
            assert health.status_code == 503 and health.json()["status"] == "dead"
            resp = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "engine_unavailable"
    finally:
        engine.terminate()


def test_overrides_string():
    assert parse_overrides("context_window_size=1024; max_num_sequence=4;max_total_seq_length=4096;") == {
        "context_window_size": 1024, "max_batch_size": 4, "kv_cache_tokens": 4096}
    for text, needle in (("gpu_memory=3", "unknown key 'gpu_memory'"), ("prefill_chunk_size", "not KEY=VALUE"),
                         ("context_window_size=big", "not an integer"), ("max_batch_size=0", "must be >= 1")):
        with pytest.raises(ValueError, match=needle):
            parse_overrides(text)


def test_serve_cli_engine_options_and_limits(tiny, engine):
    """``mlcbuild serve`` passes --overrides / --kv-cache-tokens to the engine and its limits to the app."""
    args = ("--overrides", "context_window_size=128;max_total_seq_length=512", "--max-queue", "4",
            "--request-timeout", "30", "--max-body-bytes", "4096", "--allow-origins", ORIGIN)
    with start_cli_server(str(tiny.recipe), *args) as url:
        assert metric(url, "mlcbuild_kv_pages_total") < engine.stats()["kv_pages_total"]  # 512 tokens, not 2048
        resp = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 150})
        assert resp.status_code == 400 and "maximum context length is 128" in resp.json()["error"]["message"]
        big = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 5000}]})
        assert big.status_code == 413
        assert httpx.get(url + "/v1/models", headers={"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN


def test_serve_cli_prefix_cache_and_speculation_options(tiny, tiny_draft):
    """--prefix-cache and --speculative-mode reach the engine, and /metrics reports what they did: a
    repeated prompt hits the cache only when it is on; prompt-lookup proposes tokens, and so does a draft
    model (--draft, or the recipe's speculative section); greedy text is the same every way."""
    body = {"messages": MESSAGES * 12, "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    texts = {}
    for model, *args in ((tiny.recipe, "--prefix-cache", "on"),
                         (tiny.recipe, "--prefix-cache", "off", "--speculative-mode", "prompt-lookup"),
                         (tiny.recipe, "--prefix-cache", "off", "--draft", str(tiny_draft.path)),
                         (tiny_draft.recipe, "--prefix-cache", "off", "-q", "q0f32")):  # its speculative section
        args = tuple(args)
        with start_cli_server(str(model), *args) as url:
            for _ in range(2):
                resp = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
                assert resp.status_code == 200, resp.text
            texts[args] = resp.json()["choices"][0]["message"]["content"]
            hits, drafted = metric(url, "mlcbuild_prefix_cache_hit_tokens_total"), metric(url, "mlcbuild_spec_draft_tokens_total")
            if "on" in args:
                assert hits > 0 and drafted == 0
            else:
                assert hits == 0 and drafted > 0
    assert len(set(texts.values())) == 1


@pytest.mark.parametrize("args,message", [
    (("--prefix-cache", "maybe"), "--prefix-cache 'maybe': expected on or off"),
    (("--speculative-mode", "medusa"), "--speculative-mode 'medusa': expected off, prompt-lookup or draft"),
    (("--speculative-mode", "draft"), "speculative_mode 'draft' needs a draft model: a bundle or recipe (--draft)"),
    (("--overrides", "gpu_mem=1"), "--overrides: unknown key 'gpu_mem'"),
    (("--overrides", "max_num_sequence=4", "--max-batch-size", "2"), "--max-batch-size 2 contradicts --overrides"),
    (("--max-queue", "-1"), "--max-queue"),
])
def test_serve_cli_bad_options(tiny, args, message):
    done = subprocess.run([sys.executable, "-c", "from mlcbuild.cli import main; main()", "serve", str(tiny.recipe),
                           "--no-build", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stdout + done.stderr, done.stdout + done.stderr


def test_long_prompt_does_not_stall_other_streams(engine, slow_steps):
    """A 2.9 MB prompt takes seconds to render and tokenize (then overflows the tiny context: 400); a
    stream running meanwhile keeps its pace, as that work runs off the event loop without the GIL."""
    long_body = {"messages": [{"role": "user", "content": "What is the capital of France? Tell me a story. " * 60000}]}

    async def main() -> tuple[list[float], float, float, int]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            arrivals: list[float] = []

            async def stream() -> None:
                body = {"messages": MESSAGES, "max_tokens": 200, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                    async for line in resp.aiter_lines():
                        if line.startswith("data: {"):
                            arrivals.append(time.monotonic())

            streaming = asyncio.create_task(stream())
            while len(arrivals) < 5:
                await asyncio.sleep(0.01)
            start = time.monotonic()
            resp = await client.post("/v1/chat/completions", json=long_body)
            end = time.monotonic()
            await streaming
            return arrivals, start, end, resp.status_code

    with ServerThread(create_app(engine)) as srv:
        arrivals, start, end, status = asyncio.run(main())
    assert status == 400  # longer than the tiny model's context, found out after tokenizing it
    assert end - start > 1.0, "the long prompt was quick to process: the test shows nothing"
    during = [b - a for a, b in zip(arrivals, arrivals[1:]) if start <= b <= end]
    assert len(during) > 5 and max(during) < 0.5, (end - start, max(during, default=None))
