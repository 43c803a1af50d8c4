"""CUDA decode-GEMV schedule sweep: Llama-3-8B projections (qkv, o, gate_up, down), q4f16_1, batch 1.

    python benchmarks/gpu_gemv_sweep.py build DIR [--sweep layout|splitk]   # here (nvcc)
    python benchmarks/gpu_gemv_sweep.py run DIR                             # on the GPU

``build`` compiles every variant of ``mlcbuild.compiler.kernels.cuda_schedule``'s GEMV parameters
(weights per lane per step, rows per warp, steps unrolled, warps per block, lanes along k) into
DIR/<variant>/<shape>/lib/ (library + nvcc fatbin, laid out as in a bundle); ``run`` times each kernel with random weights
(TVM time_evaluator, best of 5 x 50 calls) and prints GB/s of weight bytes per projection and
summed over the four, and each variant's largest output difference (relative to max|y|) from the
first variant on the same inputs (a ``float_*`` variant where there is one: ``--sweep dp4a``
checks the integer-dot kernel's numerics on the GPU against the float kernel). The runtime-only tvm on the GPU machine needs no compiler.
"""
import itertools
import json
import sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mlcbuild.bundle_format import LIBRARY_FILE  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def variants(sweep):
    if sweep == "dp4a":  # integer-dot batch-1 kernel (cuda_qgemv_dp4a) vs the float kernel it would replace
        yield "float_run32_rows2_u4_y4", dict(run=32, rows=2, unroll=4, rows_y=4)
        for warps, rows, steps in itertools.product((4, 8), (2, 4, 8), (2, 4)):
            yield f"dp4a_w{warps}_rows{rows}_s{steps}", dict(dp4a=(warps, rows, steps))
        return
    if sweep == "layout":  # contiguous run per lane, rows per warp, unrolled steps, warps per block
        for run, rows, unroll, rows_y in itertools.product((128, 32), (2, 4), (2, 4), (4, 8)):
            yield f"run{run}_rows{rows}_u{unroll}_y{rows_y}", dict(run=run, rows=rows, unroll=unroll, rows_y=rows_y)
        return
    for lanes, rows, rows_y in itertools.product((32, 64, 128), (1, 2, 4), (1, 2, 4)):  # split k wider
        if lanes * rows_y > 512:
            continue
        yield f"l{lanes}_rows{rows}_y{rows_y}", dict(run=32, rows=rows, unroll=4, rows_y=rows_y, lanes=lanes)


def build(root, sweep):
    import tvm
    from tvm.relax.frontend import nn
    from mlcbuild.compiler.kernels import cuda_qgemv_dp4a as dp4a
    from mlcbuild.compiler.kernels import cuda_schedule as cs
    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.scheme import family
    from mlcbuild.compiler import build as B
    from mlcbuild.compiler import pipeline as C
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    spec = get_quantization("q4f16_1")
    orig_split = cs._reduction_split
    for name, v in variants(sweep):
        if "dp4a" in v:
            dp4a.WARPS, dp4a.ROWS, dp4a.STEPS = v["dp4a"]
        else:
            cs.ROWS_PER_WARP, cs.UNROLL_STEPS, cs.ROWS_Y = v["rows"], v["unroll"], v["rows_y"]
            def split(k, bucket, run=v["run"], lanes=v.get("lanes", 32)):
                return (lanes, run) if k % (lanes * run) == 0 else orig_split(k, bucket)
            cs._reduction_split = split
        for shape, (n, k) in SHAPES.items():
            out = root / name / shape
            if (out / LIBRARY_FILE).exists():
                continue
            class P(nn.Module):
                def __init__(self):
                    self.proj = nn.Linear(k, n, bias=False)
                def forward(self, x):
                    return self.proj(x)
            model = P(); family(spec).quantize_model(model, spec)
            mod, params = model.export_tvm(spec={"forward": {"x": nn.spec.Tensor([1, 1, k], "float16"), "$": {"param_mode": "plain", "effect_mode": "none"}}})
            with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
                mod = tvm.transform.Sequential([*C.fusion_passes(), cs.CUDASchedule(target, integer_dot_batch1="dp4a" in v), *C.lowering_passes()])(mod)
                ex = tvm.compile(mod, target=target, relax_pipeline=None)
            (out / LIBRARY_FILE).parent.mkdir(parents=True, exist_ok=True)
            ex.export_library(str(out / LIBRARY_FILE))
            with target:
                B.precompile_cuda(ex.mod, "sm_90", (out / LIBRARY_FILE).parent)
            (out / "params.json").write_text(json.dumps([[p_name, [int(s) for s in p.shape], str(p.dtype)] for p_name, p in params]))
            print(name, shape, flush=True)


def run(root):
    import numpy as np
    import tvm
    from tvm.runtime.vm import VirtualMachine

    from gpu_decode import _load_runtime_cuda
    from mlcbuild.runtime.bundle import _use_prebuilt_cuda_kernels

    _load_runtime_cuda()
    dev = tvm.cuda(0)
    first = {}  # shape -> output of the first variant (the others are checked against it)
    for vdir in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: not p.name.startswith("float")):
        row, errs = {}, []
        for i, (shape, (n, k)) in enumerate(SHAPES.items()):
            d = vdir / shape
            _use_prebuilt_cuda_kernels(d)
            vm = VirtualMachine(tvm.runtime.load_module(str(d / LIBRARY_FILE)), dev)
            rng = np.random.default_rng(i)  # the same inputs for every variant
            args, nbytes = [], 0
            for p_name, shp, dt in json.loads((d / "params.json").read_text()):
                a = rng.integers(0, 1 << 32, size=shp, dtype=np.uint32) if dt == "uint32" else (rng.standard_normal(shp) * 0.02).astype(dt)
                nbytes += a.nbytes
                args.append(tvm.runtime.tensor(a, dev))
            x = tvm.runtime.tensor((rng.standard_normal((1, 1, k)) * 0.1).astype("float16"), dev)
            out = vm["forward"](x, *args).numpy().astype(np.float32)
            ref = first.setdefault(shape, out)
            errs.append(float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30)))
            f = vm.time_evaluator("forward", dev, number=50, repeat=5)
            t = min(f(x, *args).results)
            row[shape] = nbytes / t / 1e9
        print(f"{vdir.name:28s} " + "  ".join(f"{s} {row[s]:6.0f}" for s in SHAPES) + f"  | sum-time GB/s {sum(n*k for n, k in SHAPES.values())*0.5625/sum(n*k*0.5625/row[s] for s, (n, k) in SHAPES.items()):.0f}"
              f"  | max rel. diff vs first {max(errs):.1e}", flush=True)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["build", "run"])
    ap.add_argument("root", type=Path)
    ap.add_argument("--sweep", choices=["layout", "splitk", "dp4a"], default="layout")
    args = ap.parse_args()
    if args.mode == "build":
        build(args.root, args.sweep)
    else:
        run(args.root)
