"""CPU kernel micro-benchmarks on SmolLM2-135M shapes: scheduled (mlcbuild.compiler.kernels)
versus TVM 0.27's unscheduled kernels, in GB/s of weights against the DRAM bandwidth measured in
the same run.

    python benchmarks/cpu_kernels.py                 # all four quantizations, 2 threads
    python benchmarks/cpu_kernels.py --quant q4f16_1 --threads 1 --repeat 7

Sections:
  gemv      each decode projection (qkv, o, gate_up, down, lm_head) alone, batch 1; the weights
            are rotated over enough copies to leave the caches (like 30 layers would)
  mlp       a 30-layer stack of SwiGLU MLP blocks (gate_up -> silu*up -> down) through the Relax
            VM, decode batch 1: weight bytes / time
  overhead  what a Relax VM call costs: Python -> VM -> one kernel, and per extra kernel call
Prints medians over --repeat runs and ratios; no assertions (the machine is shared and noisy:
compare only numbers printed by one run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, VOCAB, LAYERS = 576, 1536, 49152, 30
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
PROJECTIONS = {  # name: (out features N, in features K)
    "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN),
    "o": (HIDDEN, HEADS * HEAD_DIM),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
    "lm_head": (VOCAB, HIDDEN),
}


def dram_bandwidth(repeat: int = 3) -> float:
    """GB/s of a numpy copy of 1 GiB, read + write bytes counted (best of ``repeat``)."""
    src = np.ones(1 << 28, dtype=np.float32)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def target() -> Any:
    import tvm
    from tvm.target import codegen

    return tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})


def fuse(mod: Any, tgt: Any, fusion: bool = True) -> Any:
    """The compile stage's passes up to (not including) scheduling (``fusion=False``: legalized
    only, one kernel per operator)."""
    import tvm
    from tvm import relax

    from mlcbuild.compiler.pipeline import fusion_passes

    passes = fusion_passes() if fusion else [relax.transform.FuseTransposeMatmul(), relax.transform.LegalizeOps(),
                                             relax.transform.AnnotateTIROpPattern()]
    with tgt:
        return tvm.transform.Sequential(passes)(mod)


def finish(mod: Any, tgt: Any, schedule: bool) -> Any:
    """The compile stage's schedule (ours, or none) and lowering, then build."""
    import tvm

    from mlcbuild.compiler.kernels import apply_cpu_schedules
    from mlcbuild.compiler.pipeline import lowering_passes

    if schedule:
        mod = apply_cpu_schedules(mod, tgt)
    with tgt:
        mod = tvm.transform.Sequential(lowering_passes())(mod)
        return tvm.compile(mod, target=tgt, relax_pipeline=None)


def random_array(shape: list[int], dtype: str, name: str, rng: np.random.Generator) -> np.ndarray:
    if dtype == "uint32":
        return rng.integers(0, 2**32, size=shape, dtype=np.uint64).astype(np.uint32)
    if "scale" in name:
        return (rng.random(shape, dtype=np.float32) * 0.02 + 0.001).astype(dtype)
    return (rng.standard_normal(shape, dtype=np.float32) * 0.05).astype(dtype)


def median_time(fn: Any, repeat: int, inner: int = 1) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


# ---- gemv --------------------------------------------------------------------------------------


def bench_gemv(quant: str, tgt: Any, repeat: int, bw: float, unscheduled: bool) -> None:
    import tvm
    from tvm.relax.frontend import nn

    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.scheme import family

    spec = get_quantization(quant)
    rng = np.random.default_rng(0)
    print(f"\n[gemv] {quant}: decode projections, batch 1 (weights rotated over copies)")
    for pname, (n, k) in PROJECTIONS.items():

        class Proj(nn.Module):
            def __init__(self) -> None:
                self.proj = nn.Linear(k, n, bias=False)

            def forward(self, x: nn.Tensor) -> nn.Tensor:
                return self.proj(x)

        model = Proj()
        family(spec).quantize_model(model, spec)
        mod, params = model.export_tvm(
            spec={"forward": {"x": nn.spec.Tensor([1, 1, k], spec.model_dtype), "$": {"param_mode": "plain", "effect_mode": "none"}}}
        )
        mod = fuse(mod, tgt)
        weight_bytes = sum(int(np.prod([int(s) for s in p.shape])) * np.dtype(str(p.dtype)).itemsize for _, p in params)
        copies = max(1, min(30, int(64e6 // weight_bytes)))  # >= 64 MB in flight unless one copy is bigger
        sets = [[tvm.runtime.tensor(random_array([int(s) for s in p.shape], str(p.dtype), name, rng)) for name, p in params] for _ in range(copies)]
        x = tvm.runtime.tensor(random_array([1, 1, k], spec.model_dtype, "x", rng))
        row = []
        for sched in ([True, False] if unscheduled else [True]):
            from tvm import relax

            vm = relax.VirtualMachine(finish(mod.clone() if hasattr(mod, "clone") else mod, tgt, sched), tvm.cpu())
            f = vm["forward"]
            state = {"i": 0}

            def call() -> None:
                f(x, *sets[state["i"] % copies])
                state["i"] += 1

            call()
            inner = copies if sched else 1
            t = median_time(call, repeat if sched else 1, inner)
            row.append((sched, t))
        t_sched = row[0][1]
        line = (
            f"  {pname:8s} [{n:5d} x {k:4d}] {weight_bytes / 1e6:6.2f} MB: {t_sched * 1e6:8.1f} us  "
            f"{weight_bytes / t_sched / 1e9:6.2f} GB/s = {weight_bytes / t_sched / 1e9 / bw:5.2f} x DRAM copy bw"
        )
        if len(row) > 1:
            line += f"   unscheduled {row[1][1] * 1e6:9.1f} us ({row[1][1] / t_sched:6.1f}x slower)"
        print(line, flush=True)


# ---- mlp stack -----------------------------------------------------------------------------------


def bench_mlp(quant: str, tgt: Any, repeat: int, bw: float, layers: int, unscheduled: bool) -> None:
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.scheme import family

    spec = get_quantization(quant)

    class MLP(nn.Module):
        def __init__(self) -> None:
            self.gate_up_proj = nn.Linear(HIDDEN, 2 * INTER, bias=False)
            self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            gate, up = nn.op.split(self.gate_up_proj(x), 2, axis=-1)
            return self.down_proj(nn.op.silu(gate) * up) + x

    class Stack(nn.Module):
        def __init__(self) -> None:
            self.layers = nn.ModuleList([MLP() for _ in range(layers)])

        def forward(self, x: nn.Tensor) -> nn.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack()
    family(spec).quantize_model(model, spec)
    mod, params = model.export_tvm(
        spec={"forward": {"x": nn.spec.Tensor([1, 1, HIDDEN], spec.model_dtype), "$": {"param_mode": "plain", "effect_mode": "none"}}}
    )
    mod = fuse(mod, tgt)
    rng = np.random.default_rng(0)
    arrays = [random_array([int(s) for s in p.shape], str(p.dtype), name, rng) for name, p in params]
    weight_bytes = sum(a.nbytes for a in arrays)
    tensors = [tvm.runtime.tensor(a) for a in arrays]
    x = tvm.runtime.tensor(random_array([1, 1, HIDDEN], spec.model_dtype, "x", rng) * 0 + np.asarray(0.1, spec.model_dtype))
    print(f"\n[mlp] {quant}: {layers}-layer SwiGLU MLP stack, decode batch 1, {weight_bytes / 1e6:.1f} MB of weights")
    results = {}
    for sched in ([True, False] if unscheduled else [True]):
        start = time.perf_counter()
        ex = finish(mod, tgt, sched)
        build_s = time.perf_counter() - start
        vm = relax.VirtualMachine(ex, tvm.cpu())
        f = vm["forward"]
        f(x, *tensors)
        t = median_time(lambda: f(x, *tensors), repeat if sched else max(1, repeat // 3))
        results[sched] = t
        tag = "scheduled  " if sched else "unscheduled"
        print(
            f"  {tag}: {t * 1e3:8.2f} ms/step  {weight_bytes / t / 1e9:6.2f} GB/s = "
            f"{weight_bytes / t / 1e9 / bw:5.2f} x DRAM copy bw   (build {build_s:.1f} s)",
            flush=True,
        )
    if len(results) == 2:
        print(f"  speedup {results[False] / results[True]:.1f}x")


# ---- VM overhead ------------------------------------------------------------------------------------


def bench_overhead(tgt: Any, repeat: int) -> None:
    import tvm
    from tvm import relax
    from tvm.relax.frontend import nn

    print("\n[overhead] Relax VM call cost (decode step of SmolLM2 at 115 tok/s = 8.7 ms)")
    for calls in (1, 301):

        class Chain(nn.Module):
            def forward(self, x: nn.Tensor) -> nn.Tensor:
                for _ in range(calls):
                    x = nn.op.add(x, x)
                return x

        mod, _ = Chain().export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, 1, HIDDEN], "float32"), "$": {"param_mode": "none", "effect_mode": "none"}}})
        ex = finish(fuse(mod, tgt, fusion=False), tgt, True)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        f = vm["forward"]
        x = tvm.runtime.tensor(np.zeros((1, 1, HIDDEN), "float32"))
        f(x)
        t = median_time(lambda: f(x), repeat, 200)
        if calls == 1:
            one = t
            print(f"  Python -> VM -> 1 kernel: {t * 1e6:.1f} us", flush=True)
        else:
            per = (t - one) / (calls - 1)
            # A SmolLM2 decode step (30 layers) executes ~2300 VM call instructions, ~300 of them
            # kernels and the rest builtins (make_shape, alloc_tensor, null_value, reshape, ...);
            # counted with VirtualMachine.set_instrument (benchmarks/cpu_e2e.py --count-calls).
            print(f"  each further kernel call: {per * 1e6:.2f} us  (x ~2300 VM calls per SmolLM2 decode step:"
                  f" ~{2300 * per * 1e3:.2f} ms of the 8.7 ms)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", nargs="*", default=["q4f16_1", "q4f32_1", "q0f16", "q0f32"])
    ap.add_argument("--threads", type=int, default=0, help="TVM_NUM_THREADS (0: all cores of this process)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--sections", nargs="*", default=["gemv", "mlp", "overhead"])
    ap.add_argument("--no-unscheduled", action="store_true", help="skip the (slow) unscheduled baselines")
    args = ap.parse_args()
    # TVM's pool defaults to cores / 2 on x86 (it assumes hyper-threads): 1 thread on 2 cores.
    os.environ["TVM_NUM_THREADS"] = str(args.threads or len(os.sched_getaffinity(0)))
    import tvm  # noqa: F401  (after TVM_NUM_THREADS)

    tgt = target()
    bw = dram_bandwidth()
    print(f"DRAM copy bandwidth {bw:.1f} GB/s (numpy, 1 GiB, read+write); target {tgt.attrs.get('mcpu')}; "
          f"TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}")
    for quant in args.quant:
        if "gemv" in args.sections:
            bench_gemv(quant, tgt, args.repeat, bw, not args.no_unscheduled)
        if "mlp" in args.sections:
            bench_mlp(quant, tgt, args.repeat, bw, args.layers, not args.no_unscheduled)
    if "overhead" in args.sections:
        bench_overhead(tgt, args.repeat)


if __name__ == "__main__":
    main()
