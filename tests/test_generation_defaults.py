"""A recipe's ``generation:`` defaults reach the bundle's chat config and every front end (unless a request
overrides them), and a front end given a recipe whose bundle is missing or stale builds it first, as
``bazel run`` does: ``mlcbuild chat/serve`` in process, ``MLCEngine`` through ``python -m mlcbuild run``.

One tiny llama built from an empty cache by ``mlcbuild chat`` itself; the stale cases change only the
recipe's generation section, which re-runs the package stage alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from subprocess_env import clean_env

RECIPE = """\
name: fresh
source: src
quantization: [q0f32]
devices: [cpu]
overrides: {context_window_size: 128, prefill_chunk_size: 32, max_batch_size: 4}
generation:
  temperature: 0
  max_tokens: MAX
"""
BUNDLE = Path("dist") / "fresh" / "q0f32-cpu"


def mlcbuild(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlcbuild", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=600, env=clean_env(MLCBUILD_CACHE_DIR=str(cwd / "cache")))


def write_recipe(root: Path, max_tokens: int) -> Path:
    recipe = root / "fresh.yaml"
    recipe.write_text(RECIPE.replace("MAX", str(max_tokens)))
    return recipe


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A recipe (generation: temperature 0, max_tokens 5) over a tiny checkpoint, nothing built, empty cache."""
    from compiler_harness import TINY, make_checkpoint
    from runtime_support import write_tokenizer

    root = tmp_path_factory.mktemp("fresh")
    write_tokenizer(make_checkpoint("llama", root / "src"), TINY["vocab_size"])
    write_recipe(root, 5)
    return root


def test_no_build_keeps_the_error_then_chat_builds_first_and_answers(fresh):
    refused = mlcbuild("chat", "fresh.yaml", "--no-build", cwd=fresh, stdin="hi\n/exit\n")
    assert refused.returncode == 1
    assert "names no built bundle" in refused.stderr and "build it first" in refused.stderr
    assert not (fresh / "cache").exists() or not any((fresh / "cache").rglob("*.json"))

    first = mlcbuild("chat", "fresh.yaml", cwd=fresh, stdin="hello there\n/exit\n")
    assert first.returncode == 0, first.stderr
    for stage in ("download", "gen_config[q0f32]", "convert_weight[q0f32]", "compile[q0f32,cpu]", "package[q0f32,cpu]"):
        assert f"build  {stage}" in first.stderr, first.stderr
    assert "ok built q0f32-cpu" in first.stderr
    assert "Chatting with fresh" in first.stdout and first.stdout.count(">>> ") == 2

    again = mlcbuild("chat", "fresh.yaml", cwd=fresh, stdin="/exit\n")
    assert again.returncode == 0, again.stderr
    assert "build " not in again.stderr and "cached" not in again.stderr  # up to date: nothing printed

    chat_config = json.loads((fresh / BUNDLE / "mlc-chat-config.json").read_text())
    assert (chat_config["temperature"], chat_config["do_sample"], chat_config["max_new_tokens"]) == (0.0, False, 5)
    manifest = json.loads((fresh / BUNDLE / "manifest.json").read_text())
    assert manifest["recipe"]["generation"] == {"temperature": 0.0, "max_tokens": 5}


def completion_tokens(engine, **request) -> tuple[int, str]:
    reply = engine.completions.create(prompt="The capital of", ignore_eos=True, **request)
    return reply.usage.completion_tokens, reply.choices[0].text


def test_python_api_builds_a_stale_recipe_through_the_cli_and_uses_its_defaults(fresh, monkeypatch, capfd):
    from mlcbuild import MLCEngine

    recipe = write_recipe(fresh, 3)  # stale: only the sampling defaults changed
    monkeypatch.setenv("MLCBUILD_CACHE_DIR", str(fresh / "cache"))
    capfd.readouterr()
    with MLCEngine(recipe) as engine:
        built = capfd.readouterr().err  # the subprocess's output: it inherits this process's stderr
        assert "build  package[q0f32,cpu]" in built and "ok 1 built" in built, built
        assert "build  compile" not in built and "build  convert_weight" not in built
        count, text = completion_tokens(engine, seed=1)
        assert count == 3  # the recipe's max_tokens
        assert completion_tokens(engine, seed=2) == (3, text)  # temperature 0 from the recipe: greedy, seed or not
        assert completion_tokens(engine, max_tokens=7)[0] == 7  # a request's own value wins
    with MLCEngine(recipe, build=False):
        assert "build" not in capfd.readouterr().err


def test_serve_uses_the_recipe_defaults(fresh):
    from runtime_support import free_port

    write_recipe(fresh, 4)
    port = free_port()
    env = clean_env(MLCBUILD_CACHE_DIR=str(fresh / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "mlcbuild", "serve", "fresh.yaml", "--port", str(port)], cwd=fresh,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import time

        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlcbuild serve did not come up"
            time.sleep(0.2)
        body = {"model": "fresh", "prompt": "The capital of", "ignore_eos": True}
        reply = httpx.post(url + "/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 4, reply
        reply = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 6}, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 6, reply
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert os.path.isfile(fresh / BUNDLE / "manifest.json")
