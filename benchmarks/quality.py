"""Perplexity of the demo model in every form, on one text, the same tokens and the same chunks.

    python benchmarks/quality.py                       # GPL-3 text, ctx 512, every chunk
    python benchmarks/quality.py --chunks 4 --json     # fewer chunks; also print the rows as JSON

Rows (SmolLM2-135M-Instruct of the offline demo, CPU):

* mlcbuild bundles q0f32, q0f16, q4f16_1, q4f32_1, q3f16_1, built by ``mlcbuild run`` from a copy of the demo
  recipe (benchmarks/peers.py's ``build_bundles``; cached nodes reused), scored by the runtime's
  ``perplexity_of_tokens`` (what ``mlcbuild eval ppl`` runs);
* transformers float32 on the Hugging Face checkpoint the demo's download stage makes;
* llama.cpp (``llama-cpp-python``): the demo's own Q4_1 GGUF, and an F16 GGUF written from it
  (benchmarks/peers.py's ``write_f16_gguf``).

The text is tokenized once, by the bundle's tokenizer, and every engine gets those ids and the chunks of
``mlcbuild.runtime.perplexity.plan_chunks``: chunks of ``--ctx`` tokens from an empty cache, the second half
of each scored (llama-perplexity's method), so the PPLs compare directly. The text defaults to the GPL-3
that Debian ships in /usr/share/common-licenses (nothing is downloaded).

The demo's source is itself a Q4_1 GGUF: "float" rows are that Q4_1 model dequantized, so llama.cpp's Q4_1
row is the reference model itself (no quantization loss of its own), while mlcbuild's 4-bit rows quantize
the dequantized Q4_1 weights again (symmetric groups of 32 with one scale, where Q4_1 has a scale and a
minimum): their loss is on top of the Q4_1 one. No assertions: the numbers of one run, to read.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import peers  # noqa: E402  (benchmarks/peers.py: the demo's GGUF, checkpoint, F16 GGUF and bundles)

QUANTIZATIONS = ("q0f32", "q0f16", "q4f16_1", "q4f32_1", "q3f16_1")
DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def score(name: str, chunk_logits: Any, tokens: list[int], args: argparse.Namespace, bos: int | None) -> dict[str, Any]:
    from mlcbuild.runtime.perplexity import evaluate

    started = time.perf_counter()
    stats, chunks = evaluate(chunk_logits, tokens, args.ctx, bos=bos, max_chunks=args.chunks,
                             on_chunk=lambda done, total, ppl: log(f"{name}: chunk {done}/{total}, PPL {ppl:.4f}"))
    seconds = time.perf_counter() - started
    return {"ppl": stats.ppl, "ppl_error": stats.ppl_error, "scored_tokens": stats.count, "chunks": len(chunks),
            "tok_s": len(chunks) * args.ctx / seconds}


def mlcbuild_rows(bundles: dict[str, Path], tokens: list[int], args: argparse.Namespace, bos: int | None) -> list[dict]:
    from mlcbuild.runtime.bundle import Bundle
    from mlcbuild.runtime.perplexity import perplexity_of_tokens

    rows = []
    for quant in QUANTIZATIONS:
        if quant not in bundles:
            rows.append({"engine": "mlcbuild", "weights": quant, "error": "build failed"})
            continue
        result = perplexity_of_tokens(Bundle.open(bundles[quant], "cpu"), tokens, args.ctx, bos=bos,
                                      max_chunks=args.chunks,
                                      on_chunk=lambda done, total, ppl, q=quant: log(f"{q}: chunk {done}/{total}, PPL {ppl:.4f}"))
        rows.append({"engine": "mlcbuild", "weights": quant, "ppl": result.ppl, "ppl_error": result.ppl_error,
                     "scored_tokens": result.scored_tokens, "chunks": result.chunks, "tok_s": result.tokens_per_second})
    return rows


def transformers_row(checkpoint: Path, tokens: list[int], args: argparse.Namespace, bos: int | None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    def chunk_logits(ids: list[int], positions: range) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, positions.start: positions.stop].numpy()

    return {"engine": "transformers", "weights": "float32", **score("transformers", chunk_logits, tokens, args, bos)}


def llama_cpp_row(label: str, path: Path, tokens: list[int], args: argparse.Namespace, bos: int | None) -> dict:
    try:
        import llama_cpp
        import llama_cpp.llama_cpp as capi
    except ImportError:
        return {"engine": "llama.cpp", "weights": label, "error": "not installed (pip install llama-cpp-python)"}
    extra_bufts = peers.llama_extra_bufts_ok(path)
    default_params = capi.llama_model_default_params

    def model_params() -> Any:
        params = default_params()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = extra_bufts
        return params

    capi.llama_model_default_params = model_params  # Llama() has no argument for it (see peers.py)
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=args.ctx, n_batch=args.ctx, n_ubatch=args.ctx,
                              n_threads=args.threads, n_threads_batch=args.threads, logits_all=True, verbose=False)
    finally:
        capi.llama_model_default_params = default_params

    def chunk_logits(ids: list[int], positions: range) -> np.ndarray:
        llm.reset()  # an empty cache for every chunk, as llama-perplexity clears it
        llm.eval(ids)
        return np.array(llm.scores[positions.start: positions.stop], dtype=np.float32)

    try:
        row = score(f"llama.cpp {label}", chunk_logits, tokens, args, bos)
    finally:
        llm.close()
    return {"engine": "llama.cpp", "weights": label + ("" if extra_bufts else " (no AMX)"), **row}


def table(rows: list[dict], args: argparse.Namespace, n_tokens: int) -> str:
    ref = next((r["ppl"] for r in rows if r["engine"] == "transformers" and "ppl" in r), None)
    f16 = next((r["ppl"] for r in rows if r["weights"] == "q0f16" and "ppl" in r), None)

    def pct(value: float, base: float | None) -> str:
        return f"{(value / base - 1) * 100:+.3f}%" if base else "-"

    chunks = next((r["chunks"] for r in rows if "chunks" in r), 0)
    lines = [f"Perplexity of SmolLM2-135M-Instruct (demo) on {args.text} ({n_tokens} tokens; {chunks} chunks of "
             f"{args.ctx}, second half scored), {cpu_model()}, {args.threads} threads",
             "",
             "| engine | weights | PPL | ± | vs transformers fp32 | vs mlcbuild q0f16 | tok/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "ppl" not in r:
            lines.append(f"| {r['engine']} | {r['weights']} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['weights']} | {r['ppl']:.4f} | {r['ppl_error']:.4f} | {pct(r['ppl'], ref)} "
                     f"| {pct(r['ppl'], f16)} | {r['tok_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=None, help="score only the first N chunks")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="checkpoint, GGUFs, bundles (default: $MLCBUILD_PEERS_DIR/quality, else the user cache's "
                             "mlcbuild-peers/quality)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="mlcbuild artifact cache (default: $MLCBUILD_CACHE_DIR, else WORK_DIR/cache)")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))

    from mlcbuild.runtime.perplexity import bos_token
    from mlcbuild.runtime.tokenizer import Tokenizer

    import platformdirs

    peers_dir = Path(os.environ.get("MLCBUILD_PEERS_DIR") or platformdirs.user_cache_path("mlcbuild-peers"))
    work = (args.work_dir or peers_dir / "quality").expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = (args.cache_dir or (Path(os.environ["MLCBUILD_CACHE_DIR"]) if os.environ.get("MLCBUILD_CACHE_DIR")
                                else work / "cache")).expanduser().resolve()
    q4_1 = peers.demo_gguf()
    checkpoint = peers.hf_checkpoint(q4_1, work)
    f16 = peers.f16_gguf(q4_1, work)
    bundles = peers.build_bundles(work, cache, list(QUANTIZATIONS), rebuild=False)
    tokenizer = Tokenizer(checkpoint)
    tokens = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=True)
    bos = bos_token(tokenizer)
    log(f"{len(tokens)} tokens (BOS substituted per chunk: {bos is not None})")

    rows = mlcbuild_rows(bundles, tokens, args, bos)
    rows.append(transformers_row(checkpoint, tokens, args, bos))
    rows.append(llama_cpp_row("F16", f16, tokens, args, bos))
    rows.append(llama_cpp_row("Q4_1 (the demo's source file)", q4_1, tokens, args, bos))
    print(table(rows, args, len(tokens)))
    if args.json:
        print(json.dumps({"cpu": cpu_model(), "ctx": args.ctx, "text": str(args.text), "tokens": len(tokens),
                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
