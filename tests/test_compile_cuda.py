"""Libraries for devices this machine does not have: CUDA (built with nvcc, no GPU needed) and
portable CPU targets (cpu:<mcpu>)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("tvm")

from mlcbuild.bundle_format import LIBRARY_FILE  # noqa: E402


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_library_builds_without_gpu(built_model):
    parts = built_model("llama", "q4f16_1", "cuda:sm_80")
    library = parts["library"] / LIBRARY_FILE
    data = library.read_bytes()
    assert data[:4] == b"\x7fELF"
    # The device code travels inside the shared library (a "cuda" module blob with PTX/cubin).
    assert b"cuda" in data and len(data) > 100_000


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
