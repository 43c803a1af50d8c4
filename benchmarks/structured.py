"""Constrained decoding: decode throughput with a JSON schema against the same requests without one.

    python benchmarks/structured.py [BUNDLE_OR_RECIPE] [--quantization q4f16_1] [--max-tokens 128]
                                    [--batches 1,8] [--repeats 5] [--device auto]

Default: the demo recipe's bundle (build it first: ``mlcbuild run recipes/smollm2-135m-instruct.yaml``).
For each batch size B, B concurrent greedy requests decode ``--max-tokens`` tokens each, once free
(``ignore_eos``) and once under a JSON schema whose shortest answer is longer than that (an array with
a large ``minItems``), so both runs decode exactly the same number of tokens and only the token masks
differ. Decode tokens per second is counted from the first request's first token to the last one's
end. The two kinds run back to back (alternating which goes first) ``--repeats`` times; prints the
median rates and the median of the pairs' ratios (the target is that constrained decoding keeps at least
90% of the unconstrained throughput), and the host CPU. On a shared machine wall-clock rates swing with
other load; the CPU time this process spends per token (all its threads) swings much less, so it is
printed too: the cost of the masks without the time the overlap hides.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from mlcbuild import MLCEngine

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "smollm2-135m-instruct.yaml"

# Records with a name, a score and tags; at least 500 of them, so generation never completes the
# grammar within --max-tokens: every step is constrained.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "records": {
            "type": "array",
            "minItems": 500,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 24},
                    "score": {"type": "integer", "minimum": 0, "maximum": 100},
                    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                },
                "required": ["name", "score", "tags"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["records"],
    "additionalProperties": False,
}
PROMPT = "List the scores of the players in our chess club, with their names and favourite colours, as JSON."


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_batch(engine: MLCEngine, batch: int, max_tokens: int, constrained: bool) -> tuple[int, float, float]:
    """``batch`` concurrent requests; (decode tokens, seconds from the first first token to the last end,
    CPU seconds this process used for the whole batch)."""
    usages: list[Any] = [None] * batch
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "club", "schema": SCHEMA}}} \
        if constrained else {}

    def one(i: int) -> None:
        reply = engine.chat.completions.create(messages=[{"role": "user", "content": f"{PROMPT} (list {i})"}],
                                               max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)
        assert reply.choices[0].finish_reason == "length", reply.choices[0]
        usages[i] = (reply.usage, time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    cpu = time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = min(start + u.extra["ttft_s"] for u, _ in usages)
    last = max(end for _, end in usages)
    tokens = sum(u.completion_tokens - 1 for u, _ in usages)  # the first token comes from prefill
    return tokens, last - first, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=str(DEMO), help="bundle directory or recipe (default: the demo)")
    parser.add_argument("--quantization", default="q4f16_1")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    quantization = args.quantization if args.bundle.endswith((".yaml", ".yml")) else None
    with MLCEngine(args.bundle, args.device, quantization=quantization, max_batch_size=max(batches)) as engine:
        engine.frontend.warm_grammars()
        device = engine.frontend.bundle.device
        for constrained in (False, True):  # warm up both paths (and compile the schema once)
            run_batch(engine, 1, 8, constrained)
        results: dict[tuple[int, bool], list[float]] = {}
        ratios: dict[int, list[float]] = {}
        cpu: dict[tuple[int, bool], list[float]] = {}
        for batch in batches:
            for repeat in range(args.repeats):
                rate = {}
                for constrained in (False, True) if repeat % 2 == 0 else (True, False):
                    tokens, seconds, cpu_seconds = run_batch(engine, batch, args.max_tokens, constrained)
                    rate[constrained] = tokens / seconds
                    cpu.setdefault((batch, constrained), []).append(cpu_seconds / (batch * args.max_tokens))
                    results.setdefault((batch, constrained), []).append(rate[constrained])
                ratios.setdefault(batch, []).append(rate[True] / rate[False])
    print(f"bundle: {engine.frontend.bundle.path} on {device}; CPU: {cpu_name()} ({_cores()} cores)")
    print(f"{args.max_tokens} tokens per request, greedy; medians of {args.repeats} runs each, the ratio the median "
          "of back-to-back pairs (robust to load that changes between pairs)")
    for batch in batches:
        free = statistics.median(results[(batch, False)])
        schema = statistics.median(results[(batch, True)])
        print(f"batch {batch}: unconstrained {free:.1f} tok/s, JSON schema {schema:.1f} tok/s, "
              f"ratio {statistics.median(ratios[batch]):.1%} (pairs: {', '.join(f'{r:.0%}' for r in ratios[batch])})")
        free_cpu, schema_cpu = (statistics.median(cpu[(batch, c)]) * 1e3 for c in (False, True))
        print(f"         CPU time per token (all threads, prefill included): unconstrained {free_cpu:.2f} ms, "
              f"JSON schema {schema_cpu:.2f} ms, ratio {free_cpu / schema_cpu:.1%}")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
