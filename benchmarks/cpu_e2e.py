"""End-to-end CPU decode / prefill of a SmolLM2-135M-shaped model with random weights, compiled
with and without mlcbuild's CPU schedules (``mlcbuild.compiler.kernels``).

    python benchmarks/cpu_e2e.py --quant q4f16_1 --schedule ours            # one build
    python benchmarks/cpu_e2e.py --quant q4f16_1 --schedule both --layers 30

Prints compile time, prefill tok/s (``--prompt`` tokens in one chunk) and decode tok/s (median of
``--gen`` greedy-shaped steps, batch 1, through batch_decode like the engine), the time of an
empty VM call, and the weight bytes / DRAM bandwidth bound measured in the same run. No
assertions: numbers to compare within one run (the machine is shared and noisy).

The build mirrors ``mlcbuild.compiler.build.build_library`` (same passes) with the llvm
schedule step swapped: ``none`` = TVM's default (no schedule), ``ours`` = apply_cpu_schedules.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cpu_kernels import dram_bandwidth  # noqa: E402  (this directory)

SMOLLM2_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0, tie_word_embeddings=True,
    max_position_embeddings=8192, rms_norm_eps=1e-5,
)


def chat_config(quant: str, layers: int, prefill_chunk: int = 512, context: int = 2048) -> dict[str, Any]:
    from mlcbuild.models.llama import LlamaConfig
    from mlcbuild.quantization import get_quantization

    cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    return {
        "model_type": "llama",
        "model_config": cfg.model_dump(),
        "quantization": quant,
        "model_dtype": get_quantization(quant).model_dtype,
        "context_window_size": context,
        "prefill_chunk_size": prefill_chunk,
        "sliding_window_size": -1,
        "max_batch_size": 8,
    }


def build(chat: dict[str, Any], out: Path, schedule: str, transpose_fusion: bool = True, kill_after_last_use: bool = True) -> float:
    """Compile like compiler.build.build_library; return seconds."""
    import tvm

    from mlcbuild.compiler.kernels import apply_cpu_schedules
    from mlcbuild.devices import parse_device
    from mlcbuild.compiler import build as B
    from mlcbuild.compiler import pipeline as P

    def pipeline_factory(target: Any, metadata: dict[str, Any], bounds: dict[str, int]) -> Any:
        @tvm.transform.module_pass(opt_level=0, name="BenchPipeline")
        def pipeline(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
            mod = P._upper_bounds(bounds)(mod)
            mod = tvm.transform.Sequential(P.fusion_passes(transpose_fusion))(mod)
            if schedule == "ours":
                mod = apply_cpu_schedules(mod, target)
            return tvm.transform.Sequential(P.lowering_passes(metadata, kill_after_last_use=kill_after_last_use))(mod)

        return pipeline

    original = B.relax_pipeline
    B.relax_pipeline = pipeline_factory
    try:
        start = time.perf_counter()
        B.build_library(chat, parse_device("cpu"), out)
        return time.perf_counter() - start
    finally:
        B.relax_pipeline = original


def random_params(metadata: dict[str, Any], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for p in metadata["params"]:
        shape, dtype = p["shape"], p["dtype"]
        if dtype == "uint32":
            a = rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
        elif "scale" in p["name"]:
            a = (rng.random(shape, dtype=np.float32) * 0.02 + 0.001).astype(dtype)
        elif p["name"].endswith("norm.weight") or "layernorm" in p["name"]:
            a = np.ones(shape, dtype=dtype)
        else:
            a = (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dtype)
        out.append(a)
    return out


class Runner:
    """Drives the library like mlcbuild.runtime.engine.CompiledModel (batch_prefill / batch_decode)."""

    def __init__(self, lib_path: Path, max_tokens: int = 2048):
        import tvm
        from tvm import relax
        from tvm.runtime import ShapeTuple

        self.tvm, self.S = tvm, ShapeTuple
        self.dev = tvm.cpu()
        self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), self.dev)
        self.meta = json.loads(self.vm["_metadata"]())
        arrays = random_params(self.meta)
        self.weight_bytes = sum(a.nbytes for a in arrays)
        self.params = [tvm.runtime.tensor(a, self.dev) for a in arrays]
        self.embed, self.prefill_fn, self.decode_fn = (self.vm[n] for n in ("embed", "batch_prefill", "batch_decode"))
        g = tvm.get_global_func
        self.begin, self.end = g("vm.builtin.kv_state_begin_forward"), g("vm.builtin.kv_state_end_forward")
        self.add, self.remove = g("vm.builtin.kv_state_add_sequence"), g("vm.builtin.kv_state_remove_sequence")
        self.reshape = g("vm.builtin.reshape")
        self.kv = self.vm["create_paged_kv_cache"](
            ShapeTuple([8]), ShapeTuple([max_tokens]), ShapeTuple([self.meta["prefill_chunk_size"]]),
            ShapeTuple([16]), ShapeTuple([0]),
        )
        self.hidden = self.meta["params"][0]["shape"][-1] if self.meta["params"] else 0

    def _emb(self, ids: list[int], shape: list[int]) -> Any:
        t = self.tvm.runtime.tensor(np.asarray(ids, dtype=np.int32), self.dev)
        e = self.embed(t, self.params)
        return self.reshape(e, self.S([*shape, e.shape[-1]]))

    def prefill(self, seq: int, ids: list[int]) -> np.ndarray:
        emb = self._emb(ids, [1, len(ids)])
        pos = self.tvm.runtime.tensor(np.asarray([len(ids) - 1], dtype=np.int32), self.dev)
        self.begin(self.kv, self.S([seq]), self.S([len(ids)]))
        logits = self.prefill_fn(emb, pos, self.kv, self.params)
        self.end(self.kv)
        return logits.numpy()

    def decode(self, seq: int, token: int) -> np.ndarray:
        emb = self._emb([token], [1, 1])
        self.begin(self.kv, self.S([seq]), self.S([1]))
        logits = self.decode_fn(emb, self.kv, self.params)
        self.end(self.kv)
        return logits.numpy()


def count_vm_calls(r: Runner, token: int) -> int:
    """VM call instructions (kernels + builtins) of one decode step."""
    count = [0]

    def instrument(func: Any, sym: str, before: bool, ret: Any, *args: Any) -> int:
        if before:
            count[0] += 1
        return 0

    r.vm.set_instrument(instrument)
    try:
        r.decode(0, token)
    finally:
        r.vm.set_instrument(lambda *a: 0)
    return count[0]


def run_one(quant: str, layers: int, schedule: str, prompt: int, gen: int, workdir: Path, transpose_fusion: bool) -> dict[str, Any]:
    chat = chat_config(quant, layers)
    lib = workdir / f"{quant}-{schedule}-{layers}.so"
    compile_s = build(chat, lib, schedule, transpose_fusion)
    r = Runner(lib)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 49152, size=prompt).tolist()
    r.add(r.kv, 0)
    t0 = time.perf_counter()
    logits = r.prefill(0, ids)
    prefill_s = time.perf_counter() - t0
    tok = int(np.argmax(logits.reshape(-1)))
    steps = []
    for _ in range(gen):
        t0 = time.perf_counter()
        logits = r.decode(0, tok)
        steps.append(time.perf_counter() - t0)
        tok = int(np.argmax(logits.reshape(-1)))
    # a second prefill on a fresh sequence (warm)
    r.add(r.kv, 1)
    t0 = time.perf_counter()
    r.prefill(1, ids)
    prefill2_s = time.perf_counter() - t0
    r.remove(r.kv, 1)
    calls = count_vm_calls(r, tok)  # last: the instrument stays installed
    r.remove(r.kv, 0)
    med = float(np.median(steps))
    return {
        "quant": quant, "schedule": schedule, "layers": layers, "compile_s": round(compile_s, 1),
        "prefill_tok_s": round(prompt / min(prefill_s, prefill2_s), 1),
        "decode_tok_s": round(1.0 / med, 1), "decode_step_ms_median": round(med * 1e3, 2),
        "decode_step_ms_min": round(min(steps) * 1e3, 2),
        "weight_mb": round(r.weight_bytes / 1e6, 1),
        "weight_gb_s": round(r.weight_bytes / med / 1e9, 2),
        "vm_calls_per_step": calls,
    }


def check(quant: str, layers: int, workdir: Path, transpose_fusion: bool) -> None:
    """Logits of the scheduled library against the unscheduled one (same random weights): a
    prefill of 20 tokens, then 4 decode steps."""
    chat = chat_config(quant, layers)
    logits = {}
    for sched in ("none", "ours"):
        lib = workdir / f"check-{quant}-{sched}-{layers}.so"
        build(chat, lib, sched, transpose_fusion)
        r = Runner(lib)
        r.add(r.kv, 0)
        out = [r.prefill(0, list(range(1000, 1020))).reshape(-1)]
        for t in (5, 17, 99, 3):
            out.append(r.decode(0, t).reshape(-1))
        logits[sched] = np.stack(out)
    a, b = logits["none"], logits["ours"]
    err = np.abs(a - b).max() / np.abs(a).max()
    agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    print(f"check {quant} ({layers} layers): max |diff| / max |logit| = {err:.2e}; argmax agreement {agree:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="q4f16_1")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--schedule", choices=["none", "ours", "both"], default="ours")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--gen-unscheduled", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="TVM_NUM_THREADS (0: all cores)")
    ap.add_argument("--no-transpose-fusion", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--check", action="store_true", help="compare logits with the unscheduled build and exit")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads or len(os.sched_getaffinity(0)))
    if args.check:
        with tempfile.TemporaryDirectory(prefix="cpu-e2e-") as tmp:
            check(args.quant, args.layers, Path(tmp), not args.no_transpose_fusion)
        return
    bw = dram_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpu-e2e-") as tmp:
        for sched in (["none", "ours"] if args.schedule == "both" else [args.schedule]):
            gen = args.gen if sched == "ours" else args.gen_unscheduled
            row = run_one(args.quant, args.layers, sched, args.prompt, gen, Path(tmp), not args.no_transpose_fusion)
            row["bw_bound_tok_s"] = round(bw * 1e9 / (row["weight_mb"] * 1e6), 1)
            row["fraction_of_bound"] = round(row["decode_tok_s"] / row["bw_bound_tok_s"], 3)
            rows.append(row)
            print(json.dumps(row) if args.json else "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    print(f"dram copy bandwidth {bw:.1f} GB/s; threads {os.environ['TVM_NUM_THREADS']}")


if __name__ == "__main__":
    main()
