"""Online serving benchmark after vLLM's ``benchmark_serving.py``: replay a dataset of chat requests
against ``mlcbuild serve`` (and, with ``--peer``, llama.cpp's server from llama-cpp-python on the same
GGUF) at a request rate, and report throughput and latency as vLLM defines them.

    python benchmarks/serving.py                                  # demo bundle, random dataset, rates 1 4 inf
    python benchmarks/serving.py --peer --num-prompts 48 --max-tokens 96 --request-rate 1 4 inf
    python benchmarks/serving.py --dataset generated-shared-prefix --goodput ttft:2000 tpot:100
    python benchmarks/serving.py --dataset sharegpt --dataset-path ShareGPT_V3_unfiltered_cleaned_split.json

Each server is started by this script on 127.0.0.1 (a free port) and stopped at the end. Requests are
sent at a Poisson rate (exponential gaps, seeded) or all at once (``inf``) by an async httpx client,
streaming (SSE). Per request: TTFT (first content chunk), ITL (gaps between content chunks), E2E latency,
and TPOT = (latency - TTFT) / (output tokens - 1), output tokens counted by tokenizing the answer with
the model's tokenizer (the same count for both servers). Both servers are asked for exactly
``--max-tokens`` tokens (mlcbuild: ``ignore_eos``; llama.cpp: ``min_tokens``), as vLLM's benchmark does.
Goodput: completed requests per second that meet every ``--goodput`` limit (milliseconds).

Datasets (seeded, so two runs send the same requests):
  random                   prompts of --input-len random tokens (+- --range-ratio), as vLLM's
  generated-shared-prefix  as SGLang's bench_serving: --num-groups system prompts of --system-prompt-len
                           tokens shared by their group, and multi-turn histories: each request is turn
                           k (0..--max-turns-1, earlier turns more frequent) of a conversation, carrying
                           its earlier questions and answers
  sharegpt                 a ShareGPT-format JSON file (--dataset-path): each conversation's first human turn,
                           the output length from its reply (capped by --max-tokens)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from peers import demo_gguf  # the benchmarks' own directory is on sys.path: python benchmarks/serving.py
from structured import cpu_name

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "smollm2-135m-instruct.yaml"


def log(msg: str) -> None:
    print(f"[serving {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


@dataclass
class Request:
    messages: list[dict[str, str]]
    max_tokens: int


def _random_text(rng: random.Random, tokenizer: Any, length: int) -> str:
    """Text of about ``length`` tokens: random ids of the vocabulary (special tokens left out), decoded."""
    vocab = tokenizer.vocab_size
    ids = [rng.randrange(100, vocab) for _ in range(length)]
    return tokenizer.decode(ids)


def random_dataset(args: argparse.Namespace, tokenizer: Any) -> list[Request]:
    rng = random.Random(args.seed)

    def length(n: int) -> int:  # uniform in n * (1 +- range_ratio), as vLLM's --random-range-ratio
        return rng.randint(max(1, round(n * (1 - args.range_ratio))), max(1, round(n * (1 + args.range_ratio))))

    return [Request([{"role": "user", "content": _random_text(rng, tokenizer, length(args.input_len))}],
                    min(length(args.max_tokens), args.max_tokens)) for _ in range(args.num_prompts)]


def shared_prefix_dataset(args: argparse.Namespace, tokenizer: Any) -> list[Request]:
    """SGLang's generated-shared-prefix with chat histories: group g's system prompt is shared by all its
    conversations; a request is turn k of one conversation, with its k earlier (question, answer) turns.
    Turn k is drawn with weight 1/(k+1): most chat requests are early turns, some carry long histories."""
    rng = random.Random(args.seed)
    systems = [_random_text(rng, tokenizer, args.system_prompt_len) for _ in range(args.num_groups)]
    conversations: dict[tuple[int, int], list[tuple[str, str]]] = {}
    weights = [1 / (k + 1) for k in range(args.max_turns)]
    requests = []
    for _ in range(args.num_prompts):
        group = rng.randrange(args.num_groups)
        conv = rng.randrange(args.conversations_per_group)
        turns = conversations.setdefault((group, conv), [])
        k = rng.choices(range(args.max_turns), weights)[0]
        while len(turns) <= k:  # the conversation's turns, made once, so its requests share their history
            turns.append((_random_text(rng, tokenizer, args.input_len), _random_text(rng, tokenizer, args.max_tokens)))
        messages = [{"role": "system", "content": systems[group]}]
        for question, answer in turns[:k]:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": turns[k][0]})
        requests.append(Request(messages, args.max_tokens))
    return requests


def sharegpt_dataset(args: argparse.Namespace, tokenizer: Any) -> list[Request]:
    if args.dataset_path is None:
        raise SystemExit("--dataset sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file)")
    try:
        data = json.loads(Path(args.dataset_path).read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--dataset-path: cannot read {args.dataset_path}: {exc}") from None
    rng = random.Random(args.seed)
    rng.shuffle(data)
    requests = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) < 2 or turns[0].get("from") not in ("human", "user"):
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        prompt_len, reply_len = len(tokenizer.encode(prompt)), len(tokenizer.encode(reply))
        if prompt_len < 4 or reply_len < 4 or prompt_len + reply_len > args.max_model_len:  # vLLM's filter
            continue
        requests.append(Request([{"role": "user", "content": prompt}], min(reply_len, args.max_tokens)))
        if len(requests) == args.num_prompts:
            break
    if not requests:
        raise SystemExit(f"--dataset-path: no usable conversations in {args.dataset_path}")
    return requests


DATASETS = {"random": random_dataset, "generated-shared-prefix": shared_prefix_dataset, "sharegpt": sharegpt_dataset}


# ----------------------------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(name: str, cmd: list[str], port: int, ready_path: str, timeout: float = 300) -> Iterator[str]:
    """Start a server, wait until ``ready_path`` answers 200, yield its URL; stop it (SIGINT, then kill)."""
    logfile = tempfile.NamedTemporaryFile("w+", prefix=f"serving-{name}-", suffix=".log", delete=False)
    log(f"starting {name}: {' '.join(cmd)} (log: {logfile.name})")
    proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see {logfile.name}:\n"
                                 + Path(logfile.name).read_text()[-3000:])
            try:
                if httpx.get(url + ready_path, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} did not come up in {timeout:.0f} s; see {logfile.name}")
            time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def mlcbuild_cmd(bundle: Path, port: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-c", "from mlcbuild.cli import main; main()", "serve", str(bundle), "--no-build",
           "--device", "cpu", "--port", str(port)]
    if args.max_batch_size:
        cmd += ["--max-batch-size", str(args.max_batch_size)]
    return cmd


# llama.cpp of 2025-08 and later uses "extra buffer types" (AMX, repacked weights) by default; on the demo's
# Q4_1 file they die of SIGILL on this kind of machine (see benchmarks/peers.py), so the server runs
# without them, as peers.py runs llama.cpp.
_LLAMA_SERVER = """
import sys
import llama_cpp.llama_cpp as capi
default_params = capi.llama_model_default_params
def model_params():
    params = default_params()
    if hasattr(params, "use_extra_bufts"):
        params.use_extra_bufts = False
    return params
capi.llama_model_default_params = model_params
from llama_cpp.server.__main__ import main
sys.argv[0] = "llama_cpp.server"
main()
"""


def llama_cpp_cmd(gguf: Path, port: int, args: argparse.Namespace) -> list[str]:
    threads = str(args.threads or os.cpu_count() or 1)
    return [sys.executable, "-c", _LLAMA_SERVER, "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "--n_ctx", str(args.max_model_len), "--n_threads", threads, "--n_threads_batch", threads,
            "--model_alias", "model",
            # its default stops the running stream when a new request arrives; a server under load queues them
            "--interrupt_requests", "False"]


# ----------------------------------------------------------------------------------------------
# The client: one streaming request, and a run at a rate
# ----------------------------------------------------------------------------------------------


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    text: str = ""
    output_tokens: int = 0


async def one_request(client: httpx.AsyncClient, url: str, model: str, request: Request) -> Result:
    body = {"model": model, "messages": request.messages, "max_tokens": request.max_tokens, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "min_tokens": request.max_tokens}
    result = Result()
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                content = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])
                if not content:
                    continue
                now = time.perf_counter()
                if not result.text:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                result.text += content
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.ok = bool(result.text)
    if not result.ok:
        result.error = "no content"
    return result


async def run_at_rate(url: str, requests: list[Request], rate: float, seed: int) -> tuple[list[Result], float]:
    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=len(requests) + 8, max_keepalive_connections=len(requests) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(3600.0), limits=limits) as client:
        model = (await client.get(url + "/v1/models")).json()["data"][0]["id"]  # the name the server answers to
        tasks = []
        start = time.perf_counter()
        for i, request in enumerate(requests):
            tasks.append(asyncio.create_task(one_request(client, url, model, request)))
            if rate != float("inf") and i + 1 < len(requests):
                await asyncio.sleep(float(rng.exponential(1.0 / rate)))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Metrics, as vLLM's benchmark_serving.py computes them
# ----------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "median": float("nan"), "p99": float("nan")}
    return {"mean": statistics.fmean(values) * 1000, "median": float(np.median(values)) * 1000,
            "p99": float(np.percentile(values, 99)) * 1000}


def metrics(results: list[Result], duration: float, tokenizer: Any, goodput: dict[str, float]) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    for r in done:
        r.output_tokens = len(tokenizer.encode(r.text))
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    good = [r for r in done
            if r.ttft * 1000 <= goodput.get("ttft", float("inf"))
            and (r.output_tokens <= 1 or (r.latency - r.ttft) / (r.output_tokens - 1) * 1000 <= goodput.get(
                "tpot", float("inf")))
            and r.latency * 1000 <= goodput.get("e2el", float("inf"))]
    output = sum(r.output_tokens for r in done)
    return {
        "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_throughput": output / duration,
        "goodput": len(good) / duration if goodput else None,
        "ttft_ms": _stats([r.ttft for r in done]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in done for x in r.itl]),
        "e2el_ms": _stats([r.latency for r in done]),
    }


def parse_goodput(items: list[str]) -> dict[str, float]:
    limits = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in ("ttft", "tpot", "e2el"):
            raise SystemExit(f"--goodput: {item!r} is not ttft:MS, tpot:MS or e2el:MS")
        try:
            limits[key] = float(value)
        except ValueError:
            raise SystemExit(f"--goodput: {item!r}: {value!r} is not a number of milliseconds") from None
    return limits


def parse_rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--request-rate: {text!r} is not a number or 'inf'") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"--request-rate must be > 0 (or inf), got {text}")
    return rate


def print_table(rows: list[tuple[str, float, dict[str, Any]]], goodput: dict[str, float]) -> None:
    head = ["server", "rate", "done", "req/s", "out tok/s"] + (["goodput"] if goodput else []) + [
        f"{m} {s}" for m in ("TTFT", "TPOT", "ITL") for s in ("mean", "median", "p99")]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|")
    for name, rate, m in rows:
        cells = [name, "inf" if rate == float("inf") else f"{rate:g}", f"{m['completed']}/{m['completed'] + m['failed']}",
                 f"{m['request_throughput']:.2f}", f"{m['output_throughput']:.1f}"]
        if goodput:
            cells.append(f"{m['goodput']:.2f}")
        cells += [f"{m[k][s]:.0f}" if k != "itl_ms" and k != "tpot_ms" else f"{m[k][s]:.1f}"
                  for k in ("ttft_ms", "tpot_ms", "itl_ms") for s in ("mean", "median", "p99")]
        print("| " + " | ".join(cells) + " |")
    print("(times in ms; TPOT = (latency - TTFT) / (output tokens - 1); ITL: gaps between streamed chunks)")


# ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEMO_RECIPE),
                    help="bundle directory or recipe (built first when missing or stale); default: the demo recipe")
    ap.add_argument("--quantization", "-q", default="q4f16_1")
    ap.add_argument("--gguf", default=None, help="the GGUF for --peer (default: the demo's source file)")
    ap.add_argument("--peer", action="store_true", help="also run llama.cpp's server (llama-cpp-python[server])")
    ap.add_argument("--only-peer", action="store_true", help="run llama.cpp's server alone")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="random")
    ap.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON file (--dataset sharegpt)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--request-rate", type=parse_rate, nargs="+", default=[1.0, 4.0, float("inf")],
                    help="requests per second (Poisson arrivals), or inf: all at once")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens (random; each question, shared-prefix)")
    ap.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    ap.add_argument("--range-ratio", type=float, default=0.0, help="random: lengths drawn in len*(1 +- ratio)")
    ap.add_argument("--system-prompt-len", type=int, default=512)
    ap.add_argument("--num-groups", type=int, default=4)
    ap.add_argument("--conversations-per-group", type=int, default=4)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-model-len", type=int, default=2048, help="context window (llama.cpp's n_ctx; a filter)")
    ap.add_argument("--max-batch-size", type=int, default=None, help="mlcbuild serve --max-batch-size")
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all CPUs)")
    ap.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                    help="SLOs for goodput: ttft:MS tpot:MS e2el:MS")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    for name in ("num_prompts", "input_len", "max_tokens", "num_groups", "conversations_per_group", "max_turns"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.range_ratio < 1:
        ap.error("--range-ratio must be in [0, 1)")
    goodput = parse_goodput(args.goodput)

    from mlcbuild.runtime.bundle import find_bundle
    from mlcbuild.runtime.tokenizer import Tokenizer

    bundle, _ = find_bundle(args.model, "cpu", args.quantization, build=True)
    tokenizer = Tokenizer(bundle)
    requests = DATASETS[args.dataset](args, tokenizer)
    prompt_tokens = [len(tokenizer.encode(json.dumps(r.messages))) for r in requests]
    print(f"CPU: {cpu_name()} ({os.cpu_count()} CPUs); bundle {bundle}")
    print(f"dataset {args.dataset}: {len(requests)} requests, ~{statistics.fmean(prompt_tokens):.0f} prompt tokens "
          f"(max {max(prompt_tokens)}), {args.max_tokens} output tokens; seed {args.seed}")

    servers: list[tuple[str, list[str], int, str]] = []
    if not args.only_peer:
        port = free_port()
        servers.append(("mlcbuild", mlcbuild_cmd(bundle, port, args), port, "/health"))
    if args.peer or args.only_peer:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError as exc:
            raise SystemExit(f"--peer needs llama-cpp-python[server] ({exc}): pip install -e '.[bench]'") from None
        gguf = Path(args.gguf) if args.gguf else demo_gguf()
        port = free_port()
        servers.append(("llama.cpp", llama_cpp_cmd(gguf, port, args), port, "/v1/models"))

    rows: list[tuple[str, float, dict[str, Any]]] = []
    for name, cmd, port, ready in servers:
        with server(name, cmd, port, ready) as url:
            asyncio.run(run_at_rate(url, requests[:2], float("inf"), args.seed))  # warm-up: load, first compile
            for rate in args.request_rate:
                log(f"{name}: {len(requests)} requests at rate {rate:g}")
                results, duration = asyncio.run(run_at_rate(url, requests, rate, args.seed))
                m = metrics(results, duration, tokenizer, goodput)
                if m["failed"]:
                    log(f"{name}: {m['failed']} failed: {m['errors']}")
                rows.append((name, rate, m))
    print_table(rows, goodput)
    if args.json:
        Path(args.json).write_text(json.dumps([{"server": n, "rate": str(r), **m} for n, r, m in rows], indent=1))


if __name__ == "__main__":
    main()
