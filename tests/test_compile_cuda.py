"""Libraries for devices this machine does not have: CUDA (built with nvcc, no GPU needed) and
portable CPU targets (cpu:<mcpu>)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from mlcbuild.bundle_format import LIBRARY_FILE  # noqa: E402


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_library_builds_without_gpu(built_model):
    import json
    import re

    from mlcbuild.bundle_format import CUDA_KERNELS_FILE, SCHEDULE_REPORT_FILE

    parts = built_model("llama", "q4f16_1", "cuda:sm_80")
    lib_dir = (parts["library"] / LIBRARY_FILE).parent
    assert sorted(p.name for p in lib_dir.iterdir()) == sorted(["model.so", Path(CUDA_KERNELS_FILE).name, "model.sm_80.fatbin",
                                                                Path(SCHEDULE_REPORT_FILE).name])
    assert json.loads((parts["library"] / SCHEDULE_REPORT_FILE).read_text()) == []  # no kernel fell back
    info = json.loads((lib_dir.parent / CUDA_KERNELS_FILE).read_text())
    assert info["arch"] == "sm_80"
    # model.so carries the CUDA source TVM generated (it cannot be loaded without a CUDA
    # runtime); nvcc's fatbin next to it holds machine code for every kernel of that source.
    library = (lib_dir / "model.so").read_bytes()
    kernels = set(re.findall(rb'__global__ void __launch_bounds__\(\d+\) (\w+)\(', library))
    assert len(kernels) > 10 and b"batch_decode_paged_kv_kernel" in kernels
    fatbin = (lib_dir / info["fatbin"]).read_bytes()
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # fatbin magic
    assert all(name in fatbin for name in kernels)
    # decode steps replay CUDA graphs captured per batch size (RewriteCUDAGraph)
    assert b"vm.builtin.cuda_graph.run_or_capture" in library


def test_portable_cpu_target_runs_here(built_model):
    """cpu:x86-64-v2 builds a library any x86-64-v2 machine runs, this one included."""
    from compiler_harness import CompiledModel

    reference = CompiledModel(built_model("llama", "q0f32"))
    portable = CompiledModel(built_model("llama", "q0f32", "cpu:x86-64-v2"))
    prompt = np.arange(7)
    ours, _, _ = portable.generate(prompt, 2)
    ref, _, _ = reference.generate(prompt, 2)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_toolchain_names_target_without_importing_tvm():
    import subprocess
    import sys

    code = (
        "import sys, json; from mlcbuild.stages.compile import Compile, CompileParams;"
        "facts = Compile().toolchain(CompileParams(quantization='q4f16_1', device='cuda:sm_90'));"
        "facts2 = Compile().toolchain(CompileParams(quantization='q0f32', device='cpu'));"
        "assert 'tvm' not in sys.modules, 'toolchain imported tvm';"
        "print(json.dumps([facts, facts2]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    cuda, cpu = json.loads(result.stdout)
    assert json.loads(cuda["target"])["arch"] == "sm_90" and "nvcc" in cuda
    assert json.loads(cpu["target"])["mcpu"]  # the host CPU's name enters the key


def test_kernel_switches_are_compile_params_of_the_devices_they_concern(tmp_path):
    """A recipe's ``kernels`` reach the CUDA compiles' params (so their keys), and leave the CPU
    compile's params at their defaults (flipping a CUDA kernel rebuilds no CPU library)."""
    from mlcbuild.recipe import Kernels, load_recipe
    from mlcbuild.stages.compile import Compile

    (tmp_path / "r.yaml").write_text("name: r\nsource: src\nquantization: q4f16_1\ndevices: [cpu, cuda:sm_90]\n"
                                     "kernels: {cuda_integer_dot_batch1: true}\n")
    loaded = load_recipe(tmp_path / "r.yaml")
    cuda = Compile.params_for(loaded, {"quantization": "q4f16_1", "device": "cuda:sm_90"})
    cpu = Compile.params_for(loaded, {"quantization": "q4f16_1", "device": "cpu"})
    assert cuda.kernels == Kernels(cuda_integer_dot_batch1=True) and cpu.kernels == Kernels()
    assert Compile().key_params(cuda)["kernels"] == {"cuda_integer_dot_batch1": True, "cuda_decode_attention": False}


# ---- the CUDA decode schedule (mlcbuild.compiler.kernels.cuda_schedule); no GPU, no nvcc ------------


def _cuda_scheduled_module(quantization: str, fallbacks: list | None = None, **kernels: bool):
    """The PrimFuncs of a tiny llama after the compile stage's CUDA pipeline (Relax passes and
    schedules; no code generation), with the kernel switches ``kernels`` (recipe.Kernels)."""
    import tvm

    from mlcbuild.recipe import Kernels

    from mlcbuild.devices import parse_device
    from mlcbuild.models import config_from_hf
    from mlcbuild.models.base_nn import build_quantized_model
    from mlcbuild.compiler.pipeline import relax_pipeline
    from mlcbuild.devices import target_dict

    config = config_from_hf(dict(model_type="llama", hidden_size=1024, intermediate_size=2048, num_hidden_layers=1,
                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
                                 max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-5))
    target = tvm.target.Target(target_dict(parse_device("cuda:sm_90")))
    model, _ = build_quantized_model(config, quantization, target)
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        return relax_pipeline(target, {}, {"seq_len": 64, "batch_size": 16}, Kernels(**kernels), fallbacks)(mod)


def _stand_in_tensor_intrinsics(monkeypatch) -> None:
    """dlight's Matmul (the branch for more than 16 rows) imports TVM's tensor-core intrinsics
    before it reads `dlight.do_not_tensorize` and returns; parsing them takes ~30 s (much more on a
    loaded machine). Every function here is marked do_not_tensorize: a stand-in will do."""
    import sys
    import types

    if "tvm.s_tir.tensor_intrin.cuda" not in sys.modules:
        stand_in = types.ModuleType("tvm.s_tir.tensor_intrin.cuda")
        stand_in.get_wmma_intrin_group = None
        monkeypatch.setitem(sys.modules, "tvm.s_tir.tensor_intrin.cuda", stand_in)


def test_decode_gemv_is_scheduled_as_a_gemv(monkeypatch):
    """Every dequantize+matmul kernel (decode, batch_decode, prefill) gets our GEMV schedule: warps
    over output rows, lanes along the packed words (one 16-byte load of a quantization group
    each), dequantization in registers, a cross-lane reduction; a symbolic batch dispatches at
    run time between GEMV buckets and dlight's Matmul (prefill)."""
    import re

    from tvm import tirx

    _stand_in_tensor_intrinsics(monkeypatch)
    fallbacks: list = []
    mod = _cuda_scheduled_module("q4f16_1", fallbacks)
    assert fallbacks == []
    gemvs = {gv.name_hint: f.script() for gv, f in mod.functions_items()
             if isinstance(f, tirx.PrimFunc) and "dequantize" in gv.name_hint and "matmul" in gv.name_hint}
    assert len(gemvs) >= 8  # qkv, o, gate_up, down, lm_head for decode / batch_decode / prefill
    for name, text in gemvs.items():
        assert '"tirx.is_scheduled": True' in text, name
        assert 'thread="threadIdx.y"' in text and 'thread="threadIdx.x"' in text, name
        assert "_rf_local" in text, name  # partial sums per lane, then a cross-lane reduction
        # the dequantized weight lives in registers only, computed with the exact bit trick
        assert re.search(r'dequantize_intermediate_local = T.sblock_alloc_buffer\(.*scope="local"', text), name
        assert not re.search(r"dequantize_intermediate = T.sblock_alloc_buffer", text), name
        assert 'T.reinterpret("float16"' in text, name
        # the packed words: 16-byte vector loads (hidden 1024: at batch 1 each of the 32 lanes
        # reads a run of 32 weights = 4 words per row and step)
        assert re.search(r"for \w+ in T.vectorized\(T.int64\(4\)\):\s+with T.sblock\(\"\w+_q_weight\w*_local\"\)", text), name
    batch = [name for name, text in gemvs.items() if "batch_size" in text]
    assert batch and all("T.tvm_thread_invariant(batch_size <= T.int64(1))" in gemvs[name] for name in batch)
    # fewer launches per decode step: the float32 casts in front of each norm are fused into it
    kernels = re.findall(r"^\s+(?:\w+ = )?(\w+)\(", mod["batch_decode"].script(), re.M)
    assert "fused_cast_cast1_fused_rms_norm_cast2" in kernels
    assert not [k for k in kernels if re.fullmatch(r"cast\d*", k)]


def test_a_gemv_schedule_that_fails_is_recorded_and_left_to_dlight(monkeypatch):
    """A GEMV the rule matched but failed to schedule is never silent: it is collected (function,
    rule, the error in one line) and dlight schedules it instead, so the build still succeeds."""
    from tvm import tirx

    from mlcbuild.compiler.kernels import cuda_schedule

    def broken(*args, **kwargs):
        raise ValueError("injected failure\nof the GEMV schedule")

    monkeypatch.setattr(cuda_schedule, "_schedule", broken)
    _stand_in_tensor_intrinsics(monkeypatch)
    fallbacks: list = []
    mod = _cuda_scheduled_module("q4f16_1", fallbacks)
    gemvs = {gv.name_hint: f.script() for gv, f in mod.functions_items()
             if isinstance(f, tirx.PrimFunc) and "dequantize" in gv.name_hint and "matmul" in gv.name_hint}
    assert sorted(f.function for f in fallbacks) == sorted(gemvs) and len(gemvs) >= 8
    assert {(f.rule, f.error) for f in fallbacks} == {("dequant-gemv", "ValueError: of the GEMV schedule")}
    for name, text in gemvs.items():  # dlight's schedule: bound to threads, not our bit-trick dequantization
        assert '"tirx.is_scheduled": True' in text and 'thread="threadIdx.x"' in text, name
        assert 'T.reinterpret("float16"' not in text, name


def test_exact_int_to_float_is_bit_identical():
    """The dequantization rewritten for the GPU (no int->float conversion instruction) computes
    the same bits as the scheme's formula, for every group-quantized scheme (run here on llvm)."""
    import tvm
    from tvm import te

    from mlcbuild.compiler.kernels.cuda_schedule import exact_int_to_float
    from mlcbuild.quantization import get_quantization
    from mlcbuild.quantization.group_quant import _dequantize_te, layout, quantize_tensor

    rng = np.random.default_rng(0)
    for name in ("q4f16_1", "q4f32_1", "q3f16_1"):
        spec = get_quantization(name)
        rows, k = 8, 160
        _, groups, words = layout(spec, k)
        qw = te.placeholder((rows, words), "uint32", name="q_weight")
        qs = te.placeholder((rows, groups), spec.model_dtype, name="q_scale")
        out = _dequantize_te(qw, qs, spec, rows, k, transpose=False)
        func = te.create_prim_func([qw, qs, out])
        rewritten = exact_int_to_float(func)
        assert "reinterpret" in rewritten.script() and "reinterpret" not in func.script()
        weight = (rng.standard_normal((rows, k)) * 0.1).astype(np.float32)
        weight[0, :40] = 0  # an all-zero group
        packed, scale = quantize_tensor(weight, spec)
        results = []
        for f in (func, rewritten):
            lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target="llvm")
            args = [tvm.runtime.tensor(packed), tvm.runtime.tensor(scale), tvm.runtime.empty((rows, k), spec.model_dtype)]
            lib["main"](*args)
            results.append(args[2].numpy())
        assert results[0].tobytes() == results[1].tobytes(), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_integer_dot_gemv_compiles_for_cuda(monkeypatch, tmp_path):
    """With ``kernels.cuda_integer_dot_batch1`` the batch-1 4-bit GEMVs are ``cuda_qgemv_dp4a``'s kernel (the
    static-batch ``decode`` ones whole, ``batch_decode``'s in its batch <= 1 branch, the float
    kernel still serving batches 2-16), and TVM's CUDA codegen and nvcc take them. Its numerics:
    tests/test_cpu_schedule.py (the same kernel emulated on the CPU)."""

    import tvm
    from tvm import tirx

    from mlcbuild.compiler.build import precompile_cuda

    _stand_in_tensor_intrinsics(monkeypatch)
    mod = _cuda_scheduled_module("q4f16_1", cuda_integer_dot_batch1=True)
    gemvs = {gv.name_hint: f for gv, f in mod.functions_items()
             if isinstance(f, tirx.PrimFunc) and "dequantize" in gv.name_hint and "matmul" in gv.name_hint}
    texts = {name: f.script() for name, f in gemvs.items()}
    with_dot = [name for name, text in texts.items() if "__dp4a" in text]
    assert len(with_dot) >= 4, sorted(texts)
    for name in with_dot:
        if "batch_size" in texts[name]:  # the dispatch keeps the float kernel for batches 2-16
            assert "T.tvm_thread_invariant(batch_size <= T.int64(1))" in texts[name]
            assert "dequantize_intermediate_local" in texts[name]
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    lib = tvm.compile(tvm.IRModule({n: gemvs[n].with_attr("global_symbol", n) for n in with_dot}), target=target)
    source = lib.mod.imports[0].inspect_source()
    assert "__dp4a(" in source and "__shfl_down_sync(" in source and "__syncthreads()" in source
    with target:
        info = precompile_cuda(lib.mod, "sm_90", tmp_path)
    assert (tmp_path / info["fatbin"]).read_bytes()[:4] == bytes.fromhex("50ed55ba")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_decode_attention_kernel_compiles_for_cuda(monkeypatch, tmp_path):
    """With ``kernels.cuda_decode_attention`` the KV cache's decode attention PrimFunc is
    ``cuda_attention``'s (the prefill and sliding-window kernels stay TVM's), and TVM's CUDA
    codegen and nvcc take it: 16-byte row loads, xor shuffles, one barrier before the merge.
    Its numerics: tests/test_cuda_attention.py (the same kernel emulated on the CPU)."""

    import tvm
    from tvm import tirx

    from mlcbuild.compiler.kernels import cuda_attention
    from mlcbuild.compiler.build import precompile_cuda

    _stand_in_tensor_intrinsics(monkeypatch)
    mod = _cuda_scheduled_module("q4f16_1", cuda_decode_attention=True)
    decode = {gv.name_hint: f for gv, f in mod.functions_items()
              if isinstance(f, tirx.PrimFunc) and f.attrs and str(f.attrs.get("global_symbol", "")) == cuda_attention.NAME}
    assert len(decode) == 1, sorted(gv.name_hint for gv in mod.get_global_vars())
    name, kernel = next(iter(decode.items()))
    assert "T.tvm_warp_shuffle_xor" in kernel.script()  # ours, not TVM's (whose rows go through shared memory)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    lib = tvm.compile(tvm.IRModule({name: kernel}), target=target)
    source = lib.mod.imports[0].inspect_source()
    assert "__shfl_xor_sync(" in source and source.count("__syncthreads()") == 1
    assert "*(uint4*)(pages_ptr" in source  # rows read as 16-byte vectors, not gathered
    with target:
        info = precompile_cuda(lib.mod, "sm_90", tmp_path)
    assert (tmp_path / info["fatbin"]).read_bytes()[:4] == bytes.fromhex("50ed55ba")
