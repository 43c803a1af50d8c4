"""Host-side sampling cost per engine step at batch 16 (issue: sampling runs on the host per sequence).

    python benchmarks/sampling.py [--batch 16] [--vocab 49152] [--steps 50]

Rows of logits shaped like a chat model's (a few likely tokens over a long flat tail: normal(0, 1) plus a
peak), sampled with mlcbuild's `sample` for the settings users run (greedy; temperature only; the demo's
0.2 / 0.9; 0.7 / 0.95), against the baseline in this script: top-p by a stable sort of the whole
vocabulary, as mlcbuild did before. Prints ms per step (all rows) and the ratio; the CPU model too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from mlcbuild.runtime.sampling import SamplingParams, _softmax, make_rng, sample


def sample_full_sort(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The baseline: temperature, softmax, top-p over the fully sorted vocabulary, one draw."""
    if params.greedy:
        return int(np.argmax(logits))
    probs = _softmax(logits.astype(np.float32) / np.float32(params.temperature)).astype(np.float64)
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        ranked = probs[order]
        keep = (np.cumsum(ranked) - ranked) < params.top_p
        keep[0] = True
        filtered = np.zeros_like(probs)
        filtered[order[keep]] = ranked[keep]
        probs = filtered / filtered.sum()
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), probs.shape[-1] - 1)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def per_step_ms(fn, rows: np.ndarray, params: SamplingParams, steps: int) -> float:
    rng = make_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        for row in rows:
            fn(row, params, rng)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    gen = np.random.default_rng(0)
    rows = gen.normal(size=(args.batch, args.vocab)).astype(np.float32)
    for row in rows:  # a peak of likely tokens, as a language model's logits have
        row[gen.choice(args.vocab, 8, replace=False)] += gen.uniform(6, 12, size=8).astype(np.float32)
    print(f"CPU: {cpu_model()}; batch {args.batch}, vocab {args.vocab}, {args.steps} steps")
    print("| setting | full sort (ms/step) | mlcbuild (ms/step) | speedup |")
    print("|---|---:|---:|---:|")
    for name, params in (("greedy", SamplingParams(temperature=0.0)),
                         ("temperature 1.0", SamplingParams(temperature=1.0)),
                         ("temperature 0.2, top_p 0.9 (demo)", SamplingParams(temperature=0.2, top_p=0.9)),
                         ("temperature 0.7, top_p 0.95", SamplingParams(temperature=0.7, top_p=0.95))):
        base = per_step_ms(sample_full_sort, rows, params, args.steps)
        ours = per_step_ms(sample, rows, params, args.steps)
        print(f"| {name} | {base:.2f} | {ours:.2f} | {base / ours:.2f}x |")


if __name__ == "__main__":
    main()
