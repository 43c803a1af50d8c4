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

    from mlcbuild.bundle_format import CUDA_KERNELS_FILE

    parts = built_model("llama", "q4f16_1", "cuda:sm_80")
    lib_dir = (parts["library"] / LIBRARY_FILE).parent
    assert sorted(p.name for p in lib_dir.iterdir()) == sorted(["model.so", Path(CUDA_KERNELS_FILE).name, "model.sm_80.fatbin"])
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
