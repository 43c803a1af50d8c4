"""Helpers for the runtime tests: a tiny bundle built by the real pipeline, and a server in a thread."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The capital of France is Paris. The capital of Spain is Madrid. Hello world!",
    "What is the answer to the question? The quick brown fox jumps over the lazy dog.",
    "User: hi there. Assistant: hello, how can I help you today? Tell me a story about cats.",
]
RECIPE = """\
name: tiny
source: src
conv_template: auto
quantization: [q0f32]
devices: [cpu]
overrides:
  context_window_size: 256
  prefill_chunk_size: 32
  max_batch_size: 8
"""


@dataclass(frozen=True)
class TinyBundle:
    recipe: Path  # a recipe naming the bundle
    path: Path  # the bundle directory
    checkpoint: Path  # the HF checkpoint it was built from (for transformers references)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A byte-level BPE whose ids 0, 1, 2 are <|endoftext|>, <|im_start|>, <|im_end|> (the tiny llama's
    eos_token_id is 2), with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 10, trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def build_tiny_bundle(root: Path) -> TinyBundle:
    """A random-weight tiny llama (transformers) with a tokenizer, built by ``mlcbuild run`` for cpu."""
    from compiler_harness import TINY, make_checkpoint

    source = make_checkpoint("llama", root / "src")
    write_tokenizer(source, TINY["vocab_size"])
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "MLCBUILD_CACHE_DIR": str(root / "cache")}
    cmd = [sys.executable, "-c", "from mlcbuild.cli import main; main()", "run", str(recipe)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return TinyBundle(recipe=recipe, path=root / "dist" / "tiny" / "q0f32-cpu", checkpoint=source)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def cli_server(*args: str, timeout: float = 60, check_exit: bool = False) -> Iterator[str]:
    """``mlcbuild serve ARGS --port P`` in a subprocess; yields its URL once /health answers, and
    stops it with SIGINT (as a user's Ctrl-C) afterwards; ``check_exit``: then it must exit 0."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-c", "from mlcbuild.cli import main; main()", "serve", *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # read its output as it comes: a server that logs more than a pipe holds must not block on it
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    finished = False
    try:
        while True:
            if proc.poll() is not None:
                reader.join(5)
                raise AssertionError("".join(output))
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mlcbuild serve did not come up"
            time.sleep(0.1)
        yield url
        finished = True
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    reader.join(5)
    if check_exit and finished:
        assert proc.wait() == 0, f"mlcbuild serve exited {proc.returncode} on Ctrl-C:\n{''.join(output)[-3000:]}"


class ServerThread:
    """uvicorn serving an app on 127.0.0.1 in a background thread."""

    def __init__(self, app: object):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


_BUILT: dict[str, TinyBundle] = {}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyBundle:
    """One bundle per test session, however many runtime test modules import this fixture."""
    if "tiny" not in _BUILT:
        root = tmp_path_factory.mktemp("runtime")
        os.environ.setdefault("MLCBUILD_VERIFY_CACHE", str(root / "verified"))
        _BUILT["tiny"] = build_tiny_bundle(root)
        # Front ends given a recipe build it first when missing or stale: the tests that open the tiny
        # recipe (engine, server, chat, their subprocesses) find it up to date in the cache it was built in.
        os.environ["MLCBUILD_CACHE_DIR"] = str(root / "cache")
    return _BUILT["tiny"]


def _build_variant(tiny: TinyBundle, directory: str, recipe_text: str) -> Path:
    """``mlcbuild run`` a variant of the tiny recipe (also named ``tiny``, reading ``../src``) in a sibling
    directory, in the tiny bundle's cache (os.environ): the nodes it shares with the tiny bundle are reused."""
    root = tiny.recipe.parent / directory
    root.mkdir(exist_ok=True)
    recipe = root / "tiny.yaml"
    recipe.write_text(recipe_text)
    cmd = [sys.executable, "-c", "from mlcbuild.cli import main; main()", "run", str(recipe)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return recipe


@pytest.fixture(scope="session")
def tiny_tp(tiny: TinyBundle) -> TinyBundle:
    """The tiny recipe fanned out over ``tensor_parallel_shards: [1, 2]``, built in the tiny bundle's cache:
    named ``tiny`` too and reading the same checkpoint (``../src``; local sources are keyed by content, not
    path), so its single-shard nodes are the tiny bundle's and only the 2-shard config, weights and library
    are built (once per session, for the tensor-parallel and server tests). ``path``: the 2-shard bundle."""
    if "tiny_tp" not in _BUILT:
        recipe = _build_variant(tiny, "tp", RECIPE.replace("source: src\n", "source: ../src\n")
                                + "  tensor_parallel_shards: [1, 2]\n")
        _BUILT["tiny_tp"] = TinyBundle(recipe=recipe, path=recipe.parent / "dist" / "tiny" / "q0f32-cpu-tp2",
                                       checkpoint=tiny.checkpoint)
    return _BUILT["tiny_tp"]


@pytest.fixture(scope="session")
def tiny_draft(tiny: TinyBundle) -> TinyBundle:
    """The tiny recipe with a second quantization, q4f32_1, that drafts for q0f32 (``speculative:``), built in
    the tiny bundle's cache (its q0f32 nodes are the tiny bundle's: only q4f32_1's weights, library and bundle
    are built). ``path``: the q4f32_1 bundle, whose greedy tokens agree with q0f32's often but not always."""
    if "tiny_draft" not in _BUILT:
        recipe = _build_variant(tiny, "draft", RECIPE.replace("source: src\n", "source: ../src\n")
                                .replace("quantization: [q0f32]", "quantization: [q0f32, q4f32_1]")
                                + "speculative:\n  mode: draft\n  draft_quantization: q4f32_1\n  tokens: 3\n")
        _BUILT["tiny_draft"] = TinyBundle(recipe=recipe, path=recipe.parent / "dist" / "tiny" / "q4f32_1-cpu",
                                          checkpoint=tiny.checkpoint)
    return _BUILT["tiny_draft"]


def engine_tokens(engine: object, prompts: list[list[int]], config: object) -> list[list[int]]:
    """Submit every prompt at once (one batch) with ``config`` (a GenerationConfig); each one's token ids."""
    import queue

    outputs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in prompts]
    for prompt, out in zip(prompts, outputs):
        engine.submit(prompt, config, out.put)  # type: ignore[attr-defined]
    tokens: list[list[int]] = []
    for out in outputs:
        got: list[int] = []
        while True:
            result = out.get(timeout=120)
            assert result.error is None, result.error
            got += [t for d in result.deltas for t in d.token_ids]
            if result.finished:
                break
        tokens.append(got)
    return tokens
