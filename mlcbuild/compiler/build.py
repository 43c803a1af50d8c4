"""Compile a model (its chat config) for a device into a shared library: the build the compile stage
runs. Builds the architecture's Relax module with the scheme's quantized layers, exports the
functions listed in ``mlcbuild.bundle_format``, lowers it with ``compiler.pipeline`` and links it
for the device (``mlcbuild.devices`` says how).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from mlcbuild.bundle_format import CUDA_KERNELS_FILE, PAGE_SIZE, CudaKernels, ScheduleFallback
from mlcbuild.compiler.pipeline import relax_pipeline
from mlcbuild.devices import DeviceSpec, target_dict
from mlcbuild.pipeline.stage import StageError
from mlcbuild.recipe import Kernels


def build_library(chat: dict[str, Any], device: DeviceSpec, out: Path, kernels: Kernels = Kernels(),
                  fallbacks: list[ScheduleFallback] | None = None) -> dict[str, Any]:
    """Compile the model a chat config describes for ``device`` into the shared library ``out``,
    with the kernel switches ``kernels``; every kernel schedule that failed and fell back is added
    to ``fallbacks``. Returns the metadata embedded in the library."""
    import tvm

    from mlcbuild.models import config_from_normalized
    from mlcbuild.models.base_nn import build_quantized_model

    target = tvm.target.Target(target_dict(device))
    if device.kind == "cpu" and device.arch and not _valid_cpu(device.arch):
        raise StageError(f"LLVM does not know the CPU {device.arch!r} (device cpu:{device.arch})")
    config = config_from_normalized(chat["model_config"])
    if chat["sliding_window_size"] > 0:  # the window the runtime slides by (a recipe may override the model's)
        config = config.model_copy(update={"sliding_window": chat["sliding_window_size"]})
    model, _ = build_quantized_model(config, chat["quantization"], target)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    metadata = {
        "model_type": chat["model_type"],
        "quantization": chat["quantization"],
        "model_dtype": chat["model_dtype"],
        "context_window_size": chat["context_window_size"],
        "prefill_chunk_size": chat["prefill_chunk_size"],
        "sliding_window_size": chat["sliding_window_size"],
        "max_batch_size": chat["max_batch_size"],
        "page_size": PAGE_SIZE,
        "kv_cache": {
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
        },
        "params": [
            {"name": name, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for name, p in named_params
        ],
    }
    bounds = {"seq_len": chat["prefill_chunk_size"], "batch_size": chat["max_batch_size"]}
    # CUDA: decode steps replay CUDA graphs (RewriteCUDAGraph, below) instead of launching each
    # of the ~10 kernels per layer from the host.
    config = {"tirx.disable_cse_tir": True, "relax.backend.use_cuda_graph": device.kind == "cuda"}
    with target, tvm.transform.PassContext(config=config):
        executable = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, metadata, bounds, kernels, fallbacks))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.so")
    executable.export_library(str(tmp))
    os.replace(tmp, out)
    if device.kind == "cuda":
        with target:  # tvm's nvcc wrapper reads the arch from the current target
            metadata["cuda"] = precompile_cuda(executable.mod, device.arch or "", out.parent)
    return metadata


def precompile_cuda(module: Any, arch: str, directory: Path) -> dict[str, str]:
    """Compile the library's CUDA kernels with nvcc, ahead of time.

    TVM 0.27 keeps CUDA *source* in the library and compiles it when the library is loaded
    (its ``tvm_callback_cuda_compile`` hook, NVRTC by default). We build the fatbin here
    instead (SASS for ``arch`` plus PTX for newer GPUs) and write it next to the library with
    the SHA-256 of the source it was built from; a runtime registers a
    ``tvm_callback_cuda_compile`` that returns this fatbin when the source's hash matches (see
    .notes/compiler.md), so loading needs neither NVRTC nor nvcc and compile errors surface
    at build time.
    """
    from tvm.support import nvcc as tvm_nvcc

    source = _find_source(module, "cuda")
    if source is None:
        raise StageError("the CUDA build produced no CUDA module")
    suffix = arch.removeprefix("sm_")
    fatbin = tvm_nvcc.compile_cuda(
        source,
        target_format="fatbin",
        arch=["-gencode", f"arch=compute_{suffix},code=[sm_{suffix},compute_{suffix}]"],
        compiler="nvcc",
    )
    name = f"model.{arch}.fatbin"
    (directory / name).write_bytes(bytes(fatbin))
    info = CudaKernels(arch=arch, fatbin=name, source_sha256=hashlib.sha256(source.encode()).hexdigest())
    (directory / Path(CUDA_KERNELS_FILE).name).write_text(info.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return info.model_dump()


def _find_source(module: Any, kind: str) -> str | None:
    if module.kind == kind:
        return module.inspect_source()
    for child in module.imports:
        found = _find_source(child, kind)
        if found is not None:
            return found
    return None


def _valid_cpu(name: str) -> bool:
    from tvm.target import codegen

    try:
        return bool(codegen.llvm_is_valid_cpu(name, "x86_64-linux-gnu"))
    except Exception:  # older signature / non-x86 triple: let LLVM complain at build time
        return True


