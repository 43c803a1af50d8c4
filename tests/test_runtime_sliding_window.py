"""A sliding-window model (Mistral-style, window of 24 tokens, q0f32) with prompts past the window: every
prefill position's logits and the engine's greedy tokens equal transformers' on the same weights, for every
chunk size (chunk boundaries inside the window and across it), one sequence or a batch of them.

The KV cache keeps window - 1 tokens; the compiled prefill masks each query row to its own window
(compiler/kernels/sliding_window.py) and the runtime puts at most window - 1 tokens of a sequence in a chunk
(CompiledModel.max_chunk_tokens): a bundle compiled with a larger prefill chunk (32 here) is driven in 23s."""

from __future__ import annotations

import queue
import subprocess
import sys

import numpy as np
import pytest

from subprocess_env import clean_env
from runtime_support import engine_tokens

WINDOW = 24
RECIPE = """\
name: slide
source: src
quantization: q0f32
devices: [cpu]
overrides:
  context_window_size: 128
  prefill_chunk_size: 32
  max_batch_size: 32
"""


@pytest.fixture(scope="module")
def sliding_bundle(tmp_path_factory):
    from compiler_harness import TINY, make_checkpoint
    from runtime_support import write_tokenizer

    root = tmp_path_factory.mktemp("sliding")
    source = make_checkpoint("mistral", root / "src", sliding_window=WINDOW)
    write_tokenizer(source, TINY["vocab_size"])
    (root / "slide.yaml").write_text(RECIPE)
    done = subprocess.run([sys.executable, "-m", "mlcbuild.cli", "run", "slide.yaml"], cwd=root,
                          env=clean_env(MLCBUILD_CACHE_DIR=str(root / "cache")), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "dist" / "slide" / "q0f32-cpu", source


@pytest.fixture(scope="module")
def transformers_model(sliding_bundle):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(sliding_bundle[1], dtype=torch.float32, attn_implementation="eager").eval()


def prompt_of(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, 300, size=length).tolist()


def reference_logits(model, prompt: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].numpy()


def reference_greedy(model, prompt: list[int], steps: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.mark.parametrize("chunk", [1, 5, 8, 16, 23, 32])
def test_prefill_logits_match_transformers_at_every_position_past_the_window(sliding_bundle, transformers_model,
                                                                                chunk):
    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.engine import CompiledModel

    bundle = Bundle.open(sliding_bundle[0], "cpu")
    assert bundle.chat_config.sliding_window_size == WINDOW and bundle.chat_config.prefill_chunk_size == 32
    model = CompiledModel(bundle, max_batch_size=1, kv_cache_tokens=128, prefill_chunk_size=32, page_size=16)
    assert model.max_chunk_tokens == WINDOW - 1
    prompt = prompt_of(3 * WINDOW)  # 72 tokens: three windows
    step = min(chunk, model.max_chunk_tokens)
    model.add_sequence(0)
    ours = np.concatenate([model.forward_prefill_at(0, prompt[i: i + step], list(range(len(prompt[i: i + step]))))
                           for i in range(0, len(prompt), step)])
    ref = reference_logits(transformers_model, prompt)
    err = np.abs(ours - ref).max(axis=1) / np.abs(ref).max()
    assert err.max() <= 1e-4, f"positions off: {np.nonzero(err > 1e-4)[0].tolist()}"


def run_engine(bundle_dir, prompts: list[list[int]], steps: int, prefill_chunk_size: int | None) -> list[list[int]]:
    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.engine import Engine, GenerationConfig
    from mlcbuild.runtime.sampling import SamplingParams

    engine = Engine(Bundle.open(bundle_dir, "cpu"), max_batch_size=len(prompts), prefill_chunk_size=prefill_chunk_size)
    try:  # submitted together: prefilled and decoded as a batch
        config = GenerationConfig(sampling=SamplingParams(temperature=0.0), max_tokens=steps, ignore_eos=True)
        return engine_tokens(engine, prompts, config)
    finally:
        engine.shutdown()


@pytest.mark.parametrize("prefill_chunk_size", [None, 5, 16])
def test_engine_greedy_tokens_equal_transformers_40_token_prompt(sliding_bundle, transformers_model,
                                                                 prefill_chunk_size):
    prompt = prompt_of(40)
    steps = 24  # decoding on to 64 tokens, sliding at every step
    ours = run_engine(sliding_bundle[0], [prompt], steps, prefill_chunk_size)
    assert ours == [reference_greedy(transformers_model, prompt, steps)]


def test_engine_batch_of_long_prompts_equals_transformers(sliding_bundle, transformers_model):
    prompts = [prompt_of(3 * WINDOW, seed=1), prompt_of(50, seed=2), prompt_of(7, seed=3)]
    steps = 12
    ours = run_engine(sliding_bundle[0], prompts, steps, None)
    assert ours == [reference_greedy(transformers_model, p, steps) for p in prompts]


def test_prefix_cache_is_off_for_sliding_window_models(sliding_bundle, transformers_model):
    """TVM's PagedKVCache cannot fork a sliding sequence: the engine turns its prefix cache off for such
    models, and a prompt extending the last one still gets transformers' tokens."""
    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.engine import Engine, GenerationConfig
    from mlcbuild.runtime.sampling import SamplingParams

    engine = Engine(Bundle.open(sliding_bundle[0], "cpu"), prefix_cache=True)
    try:
        assert engine.prefix_cache is None and engine.stats()["prefix_cache"] is False
        first = prompt_of(40, seed=4)
        for prompt in (first, first + prompt_of(20, seed=5)):
            out: queue.Queue = queue.Queue()
            engine.submit(prompt, GenerationConfig(SamplingParams(temperature=0.0), max_tokens=6, ignore_eos=True),
                          out.put)
            got: list[int] = []
            while True:
                result = out.get(timeout=120)
                got += [t for d in result.deltas for t in d.token_ids]
                if result.finished:
                    break
            assert got == reference_greedy(transformers_model, prompt, 6)
        assert engine.stats()["prefix_cache_hit_tokens"] == 0 and engine.stats()["kv_pages_in_use"] == 0
    finally:
        engine.shutdown()
