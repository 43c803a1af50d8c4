"""`mlcbuild bench`: prefill and decode speed of a bundle through the real engine.

Each repeat submits ``batch`` requests at once with the same fixed prompt of ``prompt_len`` token
ids and greedy decoding of exactly ``gen_len`` tokens (EOS ignored), then reads the engine's
per-request timings: time to first token, prefill tok/s (prompt tokens over prefill time) and
decode tok/s (tokens after the first, summed over the batch, over the decode time).
"""

from __future__ import annotations

import os
import queue
import resource
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from mlcbuild import bundle_format as bf

from .bundle import Bundle
from .engine import Engine, GenerationConfig, RequestOutput
from .sampling import SamplingParams


@dataclass
class Spread:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class BenchResult:
    model: str
    device: str
    quantization: str
    prompt_len: int
    gen_len: int
    batch: int
    repeats: int
    ttft_s: Spread
    prefill_tok_s: Spread
    decode_tok_s: Spread
    weights_bytes: int
    peak_rss_bytes: int
    threads: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_prompt(length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """Token ids that do not depend on a tokenizer, so every engine gets the very same input."""
    rng = np.random.default_rng(seed)
    return rng.integers(low=min(100, vocab_size - 1), high=vocab_size, size=length).tolist()


def run_once(engine: Engine, prompt: list[int], gen_len: int, batch: int) -> tuple[float, float, float]:
    """(median TTFT, prefill tok/s, decode tok/s summed over the batch) of one batch."""
    done: "queue.Queue[RequestOutput]" = queue.Queue()
    config = GenerationConfig(sampling=SamplingParams(temperature=0.0), max_tokens=gen_len, ignore_eos=True)

    def collect(out: RequestOutput) -> None:
        if out.finished:
            done.put(out)

    for _ in range(batch):
        engine.submit(list(prompt), config, collect)
    finished = [done.get(timeout=3600) for _ in range(batch)]
    for out in finished:
        if out.error is not None:
            raise out.error
    stats = [out.stats for out in finished]
    ttft = statistics.median(s.first_token - s.arrival for s in stats)
    prefill_start = min(s.prefill_start for s in stats)
    prefill_end = max(s.first_token for s in stats)
    prefill = sum(s.prompt_tokens for s in stats) / max(prefill_end - prefill_start, 1e-9)
    decode_start = max(s.first_token for s in stats)
    decode_end = max(s.finish for s in stats)
    decode = sum(s.decode_tokens for s in stats) / max(decode_end - decode_start, 1e-9)
    return ttft, prefill, decode


def weights_bytes(bundle: Bundle) -> int:
    """Bytes of weights one decode step reads (every tensor of the bundle's weight index)."""
    index = bf.TensorCacheIndex.model_validate_json((bundle.path / bf.TENSOR_CACHE_FILE).read_bytes())
    return sum(t.nbytes for t in index.tensors)


def bench(model: str | os.PathLike, device: str = "auto", *, prompt_len: int = 128, gen_len: int = 128,
          batch: int = 1, repeats: int = 3, warmup: int = 1, quantization: str | None = None) -> BenchResult:
    bundle = Bundle.open(model, device, quantization=quantization)
    cc = bundle.chat_config
    if prompt_len + gen_len >= cc.context_window_size:
        raise ValueError(f"prompt_len + gen_len = {prompt_len + gen_len} does not fit the model's context window "
                         f"of {cc.context_window_size} tokens")
    # No prefix cache: every run sends the same prompt, which would be a whole-prompt hit after the warm-up
    # (the prefill figure would time a fork of the cached sequence, not a prefill).
    engine = Engine(bundle, max_batch_size=max(batch, 1),
                    kv_cache_tokens=batch * (prompt_len + gen_len + 2 * cc.page_size), prefix_cache=False)
    try:
        prompt = fixed_prompt(prompt_len, cc.vocab_size)
        for _ in range(warmup):
            run_once(engine, prompt, min(gen_len, 8), batch)
        runs = [run_once(engine, prompt, gen_len, batch) for _ in range(repeats)]
    finally:
        engine.shutdown()
    return BenchResult(
        model=str(model), device=str(bundle.device), quantization=cc.quantization,
        prompt_len=prompt_len, gen_len=gen_len, batch=batch, repeats=repeats,
        ttft_s=Spread.of([r[0] for r in runs]),
        prefill_tok_s=Spread.of([r[1] for r in runs]),
        decode_tok_s=Spread.of([r[2] for r in runs]),
        weights_bytes=weights_bytes(bundle),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        threads=os.environ.get("TVM_NUM_THREADS", str(os.cpu_count())),
    )
