"""Continuous batching: throughput of 8 concurrent requests against the same 8 run one after another.

    python benchmarks/batching.py [BUNDLE_OR_RECIPE] [--requests 8] [--max-tokens 64] [--device auto]

Without a bundle it builds the tests' tiny random llama (a few seconds). Prints tokens per second of
both runs, their ratio, and the engine's decode-batch histogram for the concurrent run. All requests
are greedy with ignore_eos, so both runs generate exactly the same tokens.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from mlcbuild import MLCEngine

ROOT = Path(__file__).resolve().parent.parent


def tiny_bundle(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from runtime_support import build_tiny_bundle

    return build_tiny_bundle(root).path


def run_one(engine: MLCEngine, i: int, max_tokens: int) -> int:
    prompt = [{"role": "user", "content": f"Request {i}: tell me about the capital of France."}]
    out = engine.chat.completions.create(messages=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return out.usage.completion_tokens


def sequential(engine: MLCEngine, n: int, max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    tokens = sum(run_one(engine, i, max_tokens) for i in range(n))
    return tokens, time.perf_counter() - start


def concurrent(engine: MLCEngine, n: int, max_tokens: int) -> tuple[int, float]:
    counts = [0] * n

    def work(i: int) -> None:
        counts[i] = run_one(engine, i, max_tokens)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", help="bundle directory or recipe (default: build a tiny one)")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        with MLCEngine(bundle, args.device, max_batch_size=args.requests) as engine:
            run_one(engine, 0, 4)  # warm up
            seq_tokens, seq_s = sequential(engine, args.requests, args.max_tokens)
            before = engine.stats()["decode_batch_sizes"]
            con_tokens, con_s = concurrent(engine, args.requests, args.max_tokens)
            after = engine.stats()["decode_batch_sizes"]
            device = engine.frontend.bundle.device
    histogram = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}
    seq_rate, con_rate = seq_tokens / seq_s, con_tokens / con_s
    print(f"bundle: {bundle} on {device}")
    print(f"{args.requests} sequential requests: {seq_tokens} tokens in {seq_s:.2f}s = {seq_rate:.1f} tok/s")
    print(f"{args.requests} concurrent requests: {con_tokens} tokens in {con_s:.2f}s = {con_rate:.1f} tok/s")
    print(f"throughput ratio (concurrent / sequential): {con_rate / seq_rate:.2f}x")
    print(f"decode steps by batch size (concurrent run): {dict(sorted(histogram.items()))}")


if __name__ == "__main__":
    main()
