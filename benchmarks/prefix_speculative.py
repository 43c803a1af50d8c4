"""Prefix caching and prompt-lookup speculation on the demo bundle, each against the engine without it.

    python benchmarks/prefix_speculative.py [BUNDLE_OR_RECIPE] [--quantization q0f16] [--device auto]

(a) 8 multi-turn conversations x 6 turns over a ~1000-token shared system prompt (the GPL-3 text Debian
    ships, or a generated one): each turn's 8 requests are submitted together, greedy, 24 new tokens each;
    mean time to first token with the prefix cache on and off, and whether every answer is identical.
(b) Speculative decoding at batch 1, each against the same engine settings without it, greedy: prompt lookup
    on a summarise-this-text prompt (a ~700-token excerpt of the GPL) and on a copy-edit of the same text, and
    a draft model (the demo's q4f16_1 bundle drafting for q0f16) on the summary and on a short chat question. Decode tok/s (the request's
    decode time), acceptance rate, and whether the tokens equal the plain run's; rounds alternate the two
    engines so that the machine's drift hits both alike.
Also prints the host sampling cost at batch 16 (the issue asks it be measured before moving it).
"""

from __future__ import annotations

import argparse
import platform
import queue
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from mlcbuild.runtime.bundle import Bundle
from mlcbuild.runtime.engine import Engine, GenerationConfig
from mlcbuild.runtime.sampling import SamplingParams

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "smollm2-135m-instruct.yaml"
GPL = Path("/usr/share/common-licenses/GPL-3")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def chatml(messages: list[tuple[str, str]]) -> str:
    """SmolLM2's template (ChatML), with the assistant's turn opened."""
    return "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in messages) + "<|im_start|>assistant\n"


def generate(engine: Engine, prompts: list[list[int]], max_tokens: int,
             ignore_eos: bool = True, margins: list[list[float]] | None = None) -> list[tuple[list[int], dict]]:
    """Submit together, greedy; each request's tokens and its stats (usage extras). With ``margins``, each
    request's gap between its two most likely tokens at every step is appended there (logprobs asked)."""
    outs = [queue.SimpleQueue() for _ in prompts]
    sampling = SamplingParams(temperature=0, logprobs=margins is not None, top_logprobs=2 if margins is not None else 0)
    config = GenerationConfig(sampling, max_tokens=max_tokens, ignore_eos=ignore_eos)
    for prompt, out in zip(prompts, outs):
        engine.submit(prompt, config, out.put)
    results = []
    for out in outs:
        tokens: list[int] = []
        gaps: list[float] = []
        while True:
            o = out.get(timeout=600)
            if o.error is not None:
                raise o.error
            tokens += [t for d in o.deltas for t in d.token_ids]
            gaps += [lp.top[0][1] - lp.top[1][1] for d in o.deltas for lp in d.logprobs if len(lp.top) > 1]
            if o.finished:
                results.append((tokens, o.stats.as_dict()))
                if margins is not None:
                    margins.append(gaps)
                break
    return results


def first_difference(want: list[int], got: list[int], gaps: list[float]) -> str:
    """Where a speculative run left the plain one, and how close the plain run's top two tokens were there: a
    half-precision model's verification (several rows at once, other kernels) rounds differently from its
    decoding, which decides a near-tie the other way."""
    at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    gap = f", top-2 logit gap {gaps[at]:.4f} there" if at < len(gaps) else ""
    return f" (first difference at token {at}{gap})"


def system_prompt(engine: Engine, tokens: int) -> str:
    text = GPL.read_text() if GPL.exists() else " ".join(f"Rule {i}: be helpful and precise." for i in range(400))
    ids = engine.tokenizer.encode(text, add_special_tokens=False)[:tokens]
    return "You answer questions about this licence.\n" + engine.tokenizer.decode(ids)


def conversations(engine: Engine, system: str, convs: int, turns: int, max_tokens: int) -> tuple[list, list]:
    histories = [[("system", system)] for _ in range(convs)]
    answers, ttfts = [], []
    for turn in range(turns):
        for c, history in enumerate(histories):
            history.append(("user", f"Conversation {c}, question {turn}: what does section {turn + c} say?"))
        prompts = [engine.tokenizer.encode(chatml(h), add_special_tokens=False) for h in histories]
        for history, (tokens, stats) in zip(histories, generate(engine, prompts, max_tokens)):
            answers.append(tokens)
            ttfts.append(stats["ttft_s"])
            history.append(("assistant", engine.tokenizer.decode(tokens)))
    return answers, ttfts


def bench_prefix(bundle: Bundle) -> None:
    results = {}
    for on in (False, True):
        engine = Engine(bundle, prefix_cache=on, max_batch_size=8)
        try:
            system = system_prompt(engine, 1000)
            generate(engine, [engine.tokenizer.encode("warm up", add_special_tokens=False)], 4)
            start = time.perf_counter()
            answers, ttfts = conversations(engine, system, 8, 6, 24)
            results[on] = (answers, ttfts, time.perf_counter() - start, engine.stats())
        finally:
            engine.shutdown()
    off, on = results[False], results[True]
    print(f"(a) 8 conversations x 6 turns, shared system prompt, 24 greedy tokens a turn, batch of 8 per turn")
    for name, (answers, ttfts, wall, stats) in (("cache off", off), ("cache on", on)):
        per_turn = [statistics.mean(ttfts[t * 8:(t + 1) * 8]) for t in range(6)]
        print(f"    {name:9}: mean TTFT {statistics.mean(ttfts) * 1e3:8.1f} ms  (per turn: "
              + ", ".join(f"{x * 1e3:.0f}" for x in per_turn) + f" ms)  wall {wall:.1f} s  "
              f"hit tokens {stats['prefix_cache_hit_tokens']}  hit rate {stats['prefix_cache_hit_rate']:.1%}  "
              f"evictions {stats['prefix_cache_evictions']}")
    print(f"    TTFT off/on: {statistics.mean(off[1]) / statistics.mean(on[1]):.2f}x   "
          f"greedy outputs identical: {off[0] == on[0]}")


TASKS = {
    "summarise": "Summarise the text above in a few sentences, quoting its key phrases.",
    "edit": "Copy the text above word for word, replacing every 'GNU' with 'the GNU project'.",
}


def task_prompt(engine: Engine, task: str, tokens: int = 700) -> list[int]:
    text = GPL.read_text() if GPL.exists() else " ".join(f"Clause {i}: the licensee may copy the work." for i in range(300))
    excerpt = engine.tokenizer.decode(engine.tokenizer.encode(text, add_special_tokens=False)[:tokens])
    chat = [("system", "You are a helpful assistant."), ("user", f"{excerpt}\n\n{TASKS[task]}")]
    return engine.tokenizer.encode(chatml(chat), add_special_tokens=False)


def lookup_bound(prompt: list[int], tokens: list[int], k: int) -> float:
    """What prompt lookup could give on this output at best: tokens per model step if every step drafts ``k``
    tokens (the engine's proposer) and a verification cost no more than a decode step. The rest of the gap
    to a target is the output's own: tokens that appear nowhere earlier cannot be drafted."""
    from mlcbuild.runtime.speculative import prompt_lookup

    pos, steps = 0, 0
    while pos < len(tokens):
        draft = prompt_lookup(prompt + tokens[:pos], min(k, len(tokens) - pos - 1)) if pos else []
        accepted = next((i for i, t in enumerate(draft) if t != tokens[pos + i]), len(draft))
        pos, steps = pos + accepted + 1, steps + 1
    return len(tokens) / steps


def bench_speculative(bundle: Bundle, draft: Bundle | None, rounds: int, max_tokens: int) -> None:
    print(f"(b) speculative decoding at batch 1, greedy, {max_tokens} tokens, {rounds} alternating rounds")
    plain = Engine(bundle, max_batch_size=1, prefix_cache=False)
    try:
        summary, edit = task_prompt(plain, "summarise"), task_prompt(plain, "edit")
        question = plain.tokenizer.encode(chatml([("user", "What is the capital of France? Answer in a paragraph.")]),
                                          add_special_tokens=False)
        cases = [("prompt-lookup", "summarise", summary, {"speculative_mode": "prompt-lookup"}),
                 ("prompt-lookup", "edit", edit, {"speculative_mode": "prompt-lookup"})]
        if draft is not None:
            cases += [(f"draft {draft.manifest.quantization}", "summarise", summary, {"draft": draft}),
                      (f"draft {draft.manifest.quantization}", "question", question, {"draft": draft})]
        for mode, name, prompt, options in cases:
            for k in (1, 2, 3, 4):
                spec = Engine(bundle, max_batch_size=1, prefix_cache=False, speculative_tokens=k,
                              speculative_mode=options.get("speculative_mode", "draft"), draft=options.get("draft"))
                try:
                    plain_rates, spec_rates, same, accepted, where = [], [], True, [], ""
                    generate(spec, [prompt], 8)  # warm up both
                    generate(plain, [prompt], 8)
                    for _ in range(rounds):
                        gaps: list[list[float]] = []
                        (want, base), = generate(plain, [prompt], max_tokens, ignore_eos=False, margins=gaps)
                        (got, stats), = generate(spec, [prompt], max_tokens, ignore_eos=False)
                        if got != want and same:
                            where = first_difference(want, got, gaps[0])
                        same &= got == want
                        plain_rates.append(base["decode_tokens_per_s"])
                        spec_rates.append(stats["decode_tokens_per_s"])
                        accepted.append(stats.get("spec_acceptance_rate", 0.0))
                    ratio = statistics.median(s / p for s, p in zip(spec_rates, plain_rates))
                    print(f"    {mode:14} k={k} {name:9} ({len(prompt)} prompt tokens, {len(want)} generated): "
                          f"plain {statistics.median(plain_rates):6.1f} tok/s, speculative "
                          f"{statistics.median(spec_rates):6.1f} tok/s: {ratio:.2f}x  acceptance "
                          f"{statistics.mean(accepted):.0%}  identical tokens: {same}{where}"
                          + (f"  (bound at a verification's cost = a decode step's: {lookup_bound(prompt, want, k):.2f}x)"
                             if mode == "prompt-lookup" else ""))
                finally:
                    spec.shutdown()
    finally:
        plain.shutdown()


def bench_sampling(batch: int = 16, vocab: int = 49152) -> None:
    """Host sampling per step at batch 16: greedy and temperature/top-p, per sequence as the engine does."""
    from mlcbuild.runtime.sampling import TokenHistory
    from mlcbuild.runtime.engine import _Sequence, sample_next

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((batch, vocab)).astype(np.float32)
    for name, params in (("greedy", SamplingParams(temperature=0)),
                         ("T=0.7 top_p=0.9", SamplingParams(temperature=0.7, top_p=0.9))):
        seqs = [_Sequence(i, i, TokenHistory.of_prompt([1, 2, 3]), np.random.default_rng(i), None, None)
                for i in range(batch)]
        start = time.perf_counter()
        for _ in range(20):
            for row, seq in enumerate(seqs):
                sample_next(seq, params, logits[row])
        per_step = (time.perf_counter() - start) / 20
        print(f"    host sampling at batch {batch}, vocab {vocab}, {name}: {per_step * 1e3:.2f} ms a step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=str(DEMO), help="bundle directory or recipe (default: the demo)")
    parser.add_argument("--quantization", default="q0f16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--draft-quantization", default="q4f16_1", help="with a recipe: the draft's quantization "
                        "for (b) (none: prompt lookup only)")
    parser.add_argument("--draft", default=None, help="a draft bundle directory for (b) instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--parts", default="a,b,sampling")
    args = parser.parse_args()
    recipe = args.bundle.endswith((".yaml", ".yml"))
    bundle = Bundle.open(args.bundle, args.device, quantization=args.quantization if recipe else None, build=True)
    import os
    print(f"bundle: {bundle.path} on {bundle.device}; CPU: {cpu_name()} ({len(os.sched_getaffinity(0))} cores)")
    parts = args.parts.split(",")
    if "a" in parts:
        bench_prefix(bundle)
    if "b" in parts:
        draft = Bundle.open(args.draft, args.device) if args.draft else \
            Bundle.open(args.bundle, args.device, quantization=args.draft_quantization, build=True) \
            if recipe and args.draft_quantization != "none" else None
        bench_speculative(bundle, draft, args.rounds, args.max_tokens)
    if "sampling" in parts:
        bench_sampling()


if __name__ == "__main__":
    main()
