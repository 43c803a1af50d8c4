"""The sliding-window prefill kernels masked to each query row's window (compiler/kernels/sliding_window.py),
on CPU and CUDA: the CPU numerics are in test_runtime_sliding_window.py; here the pass itself and a CUDA
build (nvcc, no GPU needed), whose sliding-window prefill kernel no longer reads the runtime's causal flag."""

from __future__ import annotations

import re
import shutil

import pytest

pytest.importorskip("tvm")


def test_windowed_binds_causal_and_keeps_the_signature():
    import tvm
    from tvm.relax.frontend.nn.llm._prefill_kernels import _attention_prefill, _attention_prefill_cpu

    from mlcbuild.compiler.kernels.sliding_window import windowed

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_80", "max_shared_memory_per_block": 49152,
                                "max_threads_per_block": 1024, "thread_warp_size": 32})
    for kernel in (_attention_prefill_cpu(2, 4, 16, "float32", True, {}, sliding_window_size=24),
                   _attention_prefill(2, 4, 16, "float16", True, {}, target, sliding_window_size=24)):
        new = windowed(kernel)
        old_params, new_params = list(kernel.params), list(new.params)
        assert [str(p.ty) for p in new_params] == [str(p.ty) for p in old_params]
        assert [p.name for p in new_params] == [p.name if p.name != "causal" else "causal_ignored" for p in old_params]
        script = new.script()
        assert script.count("causal_ignored") == 1  # in the signature only: the body's mask has causal = 1
        assert "causal" not in script.replace("causal_ignored", "")
        with pytest.raises(ValueError, match="not TVM's paged prefill signature"):
            windowed(new.specialize({new_params[10]: 0}))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_build_of_a_sliding_window_model(built_model):
    parts = built_model("mistral", "q0f16", "cuda:sm_80", sliding_window=24)
    library = (parts["library"] / "lib" / "model.so").read_bytes()
    kernels = {name: args for name, args in
               re.findall(rb"__global__ void __launch_bounds__\(\d+\) (\w+)\(([^)]*)\)", library)}
    # TVM's paged prefill takes the runtime's causal flag; the sliding-window variant has its mask compiled in
    assert b"int causal" in kernels[b"batch_prefill_paged_kv_kernel"]
    assert b"causal" not in kernels[b"batch_prefill_paged_kv_sliding_window_kernel"]
    fatbin = next((parts["library"] / "lib").glob("*.fatbin")).read_bytes()
    assert b"batch_prefill_paged_kv_sliding_window_kernel" in fatbin
