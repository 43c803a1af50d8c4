"""A sliding-window model (Mistral-style, window of 8 tokens) run by the engine well past its window
gives the same greedy tokens as transformers on the same weights."""

from __future__ import annotations

import os
import queue
import subprocess
import sys

import numpy as np
import pytest

RECIPE = """\
name: slide
source: src
quantization: q0f32
devices: [cpu]
overrides:
  context_window_size: 64
  prefill_chunk_size: 8
"""


@pytest.fixture(scope="module")
def sliding_bundle(tmp_path_factory):
    from compiler_harness import TINY, make_checkpoint
    from runtime_support import write_tokenizer

    root = tmp_path_factory.mktemp("sliding")
    source = make_checkpoint("mistral", root / "src", sliding_window=8)
    write_tokenizer(source, TINY["vocab_size"])
    (root / "slide.yaml").write_text(RECIPE)
    env = {**os.environ, "MLCBUILD_CACHE_DIR": str(root / "cache")}
    done = subprocess.run([sys.executable, "-m", "mlcbuild.cli", "run", "slide.yaml"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return root / "dist" / "slide" / "q0f32-cpu", source


def test_engine_decodes_past_the_window_like_transformers(sliding_bundle):
    import torch
    from transformers import AutoModelForCausalLM

    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.engine import Engine, GenerationConfig
    from mlcbuild.runtime.sampling import SamplingParams

    bundle_dir, source = sliding_bundle
    bundle = Bundle.open(bundle_dir, "cpu")
    assert bundle.chat_config.sliding_window_size == 8
    # The prompt fits the window (a prefill chunk that crosses it would see up to window-1+chunk
    # tokens); decoding then runs three windows past it, sliding at every step.
    prompt = np.random.default_rng(0).integers(3, 300, size=6).tolist()
    steps = 26
    engine = Engine(bundle, max_batch_size=1)
    outputs: queue.Queue = queue.Queue()
    try:
        config = GenerationConfig(sampling=SamplingParams(temperature=0.0), max_tokens=steps, ignore_eos=True)
        engine.submit(prompt, config, outputs.put)
        ours: list[int] = []
        while True:
            out = outputs.get(timeout=120)
            assert out.error is None, out.error
            ours += [t for d in out.deltas for t in d.token_ids]
            if out.finished:
                break
    finally:
        engine.shutdown()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert ours == ids[0, len(prompt):].tolist()
