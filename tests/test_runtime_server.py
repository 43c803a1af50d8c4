"""The OpenAI-compatible server, driven by the real ``openai`` client (sync and async) and by ``curl``.
The tests taking ``server`` run twice: on a server in a thread over the tiny bundle, and on
``mlcbuild serve --overrides tensor_parallel_shards=2`` over its 2-shard build (issue 15)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from types import SimpleNamespace

import httpx
import pytest
from runtime_support import ServerThread, tiny, tiny_tp  # noqa: F401 (shared fixtures)
from runtime_support import cli_server as start_cli_server

from mlcbuild import AsyncMLCEngine, MLCEngine
from mlcbuild.runtime.server import create_app

openai = pytest.importorskip("openai")

KEY = "sk-test"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=[1, 2], ids=["1shard", "2shards"])
def server(request, tiny):
    """``url`` and ``recipe`` of a server of the tiny model: the app in a thread (1 shard), or ``mlcbuild serve
    --overrides tensor_parallel_shards=2`` in a subprocess (2 shards). Module scope: one server of each."""
    if request.param == 1:
        engine = AsyncMLCEngine(tiny.recipe)
        with ServerThread(create_app(engine, api_key=KEY, model_aliases=(str(tiny.recipe),))) as srv:
            srv.recipe = tiny.recipe
            yield srv
        engine.terminate()
        return
    tp = request.getfixturevalue("tiny_tp")
    with start_cli_server(str(tp.recipe), "--api-key", KEY, "--overrides", "tensor_parallel_shards=2",
                          check_exit=True) as url:  # and Ctrl-C stops it cleanly (exit 0), workers and all
        yield SimpleNamespace(url=url, recipe=tp.recipe)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name if "le=" in name or "path=" in name else name.split("{")[0]] = float(value)
    return values


def test_models_health_and_metrics_format(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE mlcbuild_kv_pages_in_use gauge" in text and "# TYPE mlcbuild_requests_total counter" in text
    assert 'mlcbuild_decode_batch_size_bucket{model="tiny",le="+Inf"}' in text
    assert metrics(server)["mlcbuild_kv_pages_total"] > 0


def test_sync_client_stream_and_whole_match_engine(server, client, tiny):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=20, seed=42, temperature=0.9)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    with MLCEngine(tiny.path) as local:  # the same request through the Python API: the same text
        assert local.chat.completions.create(**kwargs).choices[0].message.content == text
    comp = client.completions.create(model=str(server.recipe), prompt="The capital of", max_tokens=8, seed=1, n=2)
    assert len(comp.choices) == 2 and comp.usage.completion_tokens <= 16 and comp.object == "text_completion"


def test_async_client_concurrent_streams(server):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=i,
                                                          stream=True, extra_body={"ignore_eos": True})
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        texts = await asyncio.gather(*(one(i) for i in range(6)))
        whole = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, seed=4,
                                                     extra_body={"ignore_eos": True})
        assert whole.choices[0].message.content == texts[4]
        await client.close()
        return texts

    assert len(asyncio.run(main())) == 6


@pytest.fixture(scope="module")
def cli_server(tiny):
    """``mlcbuild serve RECIPE --port P --api-key KEY`` in a subprocess."""
    with start_cli_server(str(tiny.recipe), "--api-key", KEY) as url:
        yield url


def curl(*args: str) -> str:
    return subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60, check=True).stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_against_mlcbuild_serve(cli_server):
    auth = ["-H", f"Authorization: Bearer {KEY}", "-H", "Content-Type: application/json"]
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    out = curl("-N", cli_server + "/v1/chat/completions", *auth, "-d", json.dumps(body))
    events = [line[len("data: "):] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and 0 < chunks[-1]["usage"]["completion_tokens"] <= 6
    out = json.loads(curl(cli_server + "/v1/completions", *auth, "-d", json.dumps({"prompt": "Hello", "max_tokens": 3})))
    assert out["object"] == "text_completion" and out["choices"][0]["finish_reason"] in ("stop", "length")
    assert json.loads(curl(cli_server + "/v1/models", *auth))["data"][0]["id"] == "tiny"
    assert json.loads(curl(cli_server + "/v1/models"))["error"]["code"] == "invalid_api_key"
    assert "mlcbuild_kv_pages_in_use" in curl(cli_server + "/metrics")


@pytest.mark.parametrize("body,status,param", [
    ({"messages": MESSAGES, "temperature": 3}, 400, "temperature"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ({"messages": MESSAGES, "n": 0}, 400, "n"),
    ({"messages": MESSAGES, "top_logprobs": 3}, 400, "top_logprobs"),
    ({"messages": MESSAGES, "logit_bias": {"abc": 1}}, 400, "logit_bias.abc"),
    ({}, 400, "messages"),
    ({"messages": MESSAGES, "model": "gpt-9"}, 404, "model"),
    ({"messages": MESSAGES, "max_tokens": 10000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x " * 400}]}, 400, "messages"),
    ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, 400, "tools"),
    ({"messages": MESSAGES, "response_format": {"type": "xml"}}, 400, "response_format.type"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    resp = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_auth_bad_json_and_unknown_routes(server, client):
    assert httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES}).status_code == 401
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    resp = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    assert httpx.get(server.url + "/v2/nothing").status_code == 404
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[1, 999999], max_tokens=2)
    assert info.value.body["param"] == "prompt"


def test_cancelled_streams_free_their_pages(server):
    """16 concurrent streams, 4 closed halfway: the rest complete; afterwards no KV page is in use."""
    before = metrics(server)

    async def main() -> list[object]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def one(i: int) -> object:
            stream = await client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, seed=i,
                                                          stream=True, extra_body={"ignore_eos": True})
            chunks = 0
            async for chunk in stream:
                chunks += 1
                if i % 4 == 0 and chunks == 5:
                    await stream.close()  # closes the HTTP connection mid-stream
                    return "cancelled"
                if chunk.choices and chunk.choices[0].finish_reason:
                    return chunk.choices[0].finish_reason
            return "ended"

        results = await asyncio.gather(*(one(i) for i in range(16)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert results.count("cancelled") == 4 and results.count("length") == 12, results
    for _ in range(100):
        after = metrics(server)
        if after["mlcbuild_aborted_total"] - before["mlcbuild_aborted_total"] == 4 and after["mlcbuild_running"] == 0:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert after["mlcbuild_aborted_total"] - before["mlcbuild_aborted_total"] == 4
    assert after["mlcbuild_finished_total"] - before["mlcbuild_finished_total"] == 12
    assert after["mlcbuild_kv_pages_in_use"] == 0 and after["mlcbuild_queued"] == 0
    # and batching was real: some decode steps carried more than one sequence
    steps = after["mlcbuild_decode_steps_total"] - before["mlcbuild_decode_steps_total"]
    seqs = after["mlcbuild_decode_sequences_total"] - before["mlcbuild_decode_sequences_total"]
    assert seqs > steps > 0
