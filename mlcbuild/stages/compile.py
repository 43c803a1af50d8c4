"""compile: mlc-chat-config.json + (quantization, device) -> lib/model.so.

Builds the architecture's Relax module with the scheme's quantized layers, exports the functions
listed in ``mlcbuild.bundle_format``, lowers it with TVM (operator fusion, dequantize+matmul
fusion, dlight schedules) and links one shared library for the device.

Devices: ``cpu`` (llvm for this host's CPU, whose name enters the node key), ``cpu:<mcpu>``
(a named x86-64 level or CPU), ``cuda:sm_XX`` (CUDA via nvcc; no GPU needed to build).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlcbuild.bundle_format import (CHAT_CONFIG_FILE, CUDA_KERNELS_FILE, LIBRARY_FILE, SCHEDULE_REPORT_FILE,
                                   CudaKernels, ScheduleFallback)
from mlcbuild.cache.location import default_cache_dir
from mlcbuild.devices import DeviceSpec, parse_device
from mlcbuild.hostinfo import cpu_identity
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageError, StageParams
from mlcbuild.recipe import Kernels, LoadedRecipe
from mlcbuild.stages import register_stage

PAGE_SIZE = 16
COMPILE_MEMORY = 2 << 30  # what a compile node asks a cluster for (see Compile.resources)
NVCC_MEMORY = 1 << 30


class CompileParams(StageParams):
    quantization: str
    device: str
    kernels: Kernels = Kernels()  # the recipe's kernel switches, those of other devices left at default


@register_stage
class Compile(Stage):
    name = "compile"
    version = 5  # 2: CUDA kernels prebuilt with nvcc (fatbin), no tensor-core tensorization; 3: CPU schedules;
    # 4: casts fused into the norms on every target; CUDA graphs for decode; 5: reshape chains
    # folded into views (no copy kernels around attention)
    Params = CompileParams
    thread_safe = False  # TVM keeps process-global builder state

    @classmethod
    def params_for(cls, loaded: LoadedRecipe, axes: dict[str, str]) -> CompileParams:
        device = parse_device(axes["device"])
        # A switch enters only the keys of the devices it concerns: flipping a CUDA kernel on
        # rebuilds no CPU library.
        kernels = loaded.recipe.kernels if device.kind == "cuda" else Kernels()
        return CompileParams(quantization=axes["quantization"], device=device.name, kernels=kernels)

    def toolchain(self, params: CompileParams) -> dict[str, str]:
        # (our kernel schedules are code of this stage: the key covers them, see Stage.code_modules)
        facts = {"tvm": _tvm_version(), "target": json.dumps(target_dict(parse_device(params.device)), sort_keys=True)}
        if parse_device(params.device).kind == "cuda":
            facts["nvcc"] = nvcc_version()
        return facts

    def watch_paths(self, params: CompileParams) -> list[Path]:
        return nvcc_files(params.device)

    def resources(self, params: CompileParams) -> Resources:
        # One core (TVM lowers on one thread); memory: TVM's module of every kernel, plus nvcc
        # beside it for CUDA (peaks measured in benchmarks/distributed.py); a CUDA compile needs
        # a worker with nvcc, declared as the custom resource "nvcc".
        if parse_device(params.device).kind == "cuda":
            return Resources(cpus=1, memory_bytes=COMPILE_MEMORY + NVCC_MEMORY, custom={"nvcc": 1})
        return Resources(cpus=1, memory_bytes=COMPILE_MEMORY)

    def run(self, ctx: StageContext) -> None:
        chat = json.loads((ctx.inputs["config"] / CHAT_CONFIG_FILE).read_text(encoding="utf-8"))
        if chat["quantization"] != ctx.params.quantization:
            raise StageError(f"config was generated for {chat['quantization']}, not {ctx.params.quantization}")
        device = parse_device(ctx.params.device)
        out = ctx.out / LIBRARY_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        fallbacks: list[ScheduleFallback] = []
        build_library(chat, device, out, ctx.params.kernels, fallbacks)
        # Never silent: a kernel that fell back to a slower schedule is a warning of this node
        # (kept in its record) and listed in the bundle's manifest by the package stage.
        report = [f.model_dump() for f in fallbacks]
        (ctx.out / SCHEDULE_REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        for fallback in fallbacks:
            ctx.warn(fallback.describe())
        ctx.log(f"compile: {chat['model_type']} {chat['quantization']} for {device.name} in {time.perf_counter() - start:.1f} s")


# ---- toolchain facts (cheap: no tvm import) ---------------------------------------------------


def _tvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:
        return "unknown"


def _facts_dir() -> Path:
    path = Path(default_cache_dir()) / "host-facts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _memo(key: str, compute: Any) -> str:
    """A host fact computed once per key and kept in a small file under the cache dir (the
    computation costs a second; the no-op rerun budget does not allow that every time)."""
    path = _facts_dir() / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    value = compute()
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(value, encoding="utf-8")
    os.replace(tmp, path)
    return value


def host_cpu() -> str:
    """LLVM's name for this host's CPU (e.g. "znver3", "sapphirerapids"), memoized by the
    /proc/cpuinfo model name and feature flags so a different CPU gets a fresh answer."""
    key = "host-cpu\n" + cpu_identity()

    def compute() -> str:
        code = "import tvm.target.codegen as c; print(c.llvm_get_system_cpu())"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return result.stdout.strip().splitlines()[-1]

    return _memo(key, compute)


def nvcc_files(device: str) -> list[Path]:
    """The nvcc executable (resolved) whose version a stage building for ``device`` records."""
    nvcc = shutil.which("nvcc") if parse_device(device).kind == "cuda" else None
    return [Path(os.path.realpath(nvcc))] if nvcc else []


def nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "absent"
    real = os.path.realpath(nvcc)
    stat = os.stat(real)

    def compute() -> str:
        result = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True)
        return result.stdout.strip().splitlines()[-1]

    return _memo(f"nvcc\n{real}\n{stat.st_size}\n{stat.st_mtime_ns}", compute)


def target_dict(device: DeviceSpec) -> dict[str, Any]:
    """The TVM 0.27 target (a JSON dict: the string form is refused) for a device."""
    if device.kind == "cpu":
        return {"kind": "llvm", "mcpu": device.arch or host_cpu()}
    # Limits every CUDA GPU since sm_50 meets (the 48 KiB static shared memory any kernel may
    # use); the host side stays generic x86-64 so the library loads on any server CPU.
    return {
        "kind": "cuda",
        "arch": device.arch,
        "max_shared_memory_per_block": 49152,
        "max_threads_per_block": 1024,
        "thread_warp_size": 32,
        "host": {"kind": "llvm"},
    }


# ---- the build --------------------------------------------------------------------------------


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
        executable = tvm.compile(mod, target=target, relax_pipeline=_pipeline(target, metadata, bounds, kernels, fallbacks))
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


def _pipeline(target: Any, metadata: dict[str, Any], bounds: dict[str, int], kernels: Kernels = Kernels(),
              fallbacks: list[ScheduleFallback] | None = None) -> Any:
    import tvm
    from tvm import relax

    if target.kind.name == "llvm":
        from mlcbuild.compiler_passes import CPUSchedule

        # TVM's default llvm lowering applies no schedule (and dlight's cpu rules made codegen
        # ~10x slower without speeding decode up): our rules do GEMV/GEMM/attention by hand.
        sliding = (metadata.get("sliding_window_size") or -1) > 0
        schedule = CPUSchedule(target, replace_attention=not sliding, fallbacks=fallbacks)
        after_memory_plan = []
    else:
        from mlcbuild.compiler_passes.cuda_schedule import CUDASchedule

        # Decode GEMVs (dequantize fused, batch-dispatched) by our rule, the rest by dlight.
        # TVM 0.27's tensor-core path of dlight's Matmul rule segfaults inside
        # s_tir::Tensorize on our fused f16 matmuls (any hidden size >= 128, sm_80 and sm_90);
        # the attribute keeps the rule's tiled shared-memory schedule without tensorizing.
        schedule = tvm.transform.Sequential([
            _annotate("dlight.do_not_tensorize", True, prim_funcs=True),
            CUDASchedule(target, integer_dot_batch1=kernels.cuda_integer_dot_batch1,
                         decode_attention=kernels.cuda_decode_attention, fallbacks=fallbacks),
        ])
        # A small model's decode step is launch-bound (~10 kernels per layer, ~8 us each from the
        # host; SmolLM2 batch 1 on an H100: 379 -> 638 tok/s): the static stretches between two
        # KV-cache attention calls become CUDA graphs, captured once per batch size (as MLC LLM
        # does) and replayed on later steps.
        after_memory_plan = [
            _annotate("relax.rewrite_cuda_graph.capture_symbolic_vars", ["batch_size"], names=("decode", "batch_decode")),
            relax.transform.RewriteCUDAGraph(),
        ]
    return tvm.transform.Sequential(
        [_upper_bounds(bounds), *fusion_passes(), schedule, *lowering_passes(metadata, after_memory_plan=after_memory_plan)],
        name="MlcbuildPipeline",
    )


def fusion_passes(transpose_fusion: bool = True) -> list[Any]:
    """Relax passes before scheduling: legalize, fuse, and our fusions (dequantize into matmul,
    casts into norms). ``transpose_fusion``: NT matmuls read the weight as stored (without it
    every 16/32-bit matmul first copies its weight into a transpose, every call)."""
    from tvm import relax

    from mlcbuild.compiler_passes.relax_fusion import FuseCastsIntoNorm
    from mlcbuild.quantization.fusion import FuseDequantizeMatmul

    return [
        # A reshape of a reshape (the model's head split, then the KV cache's flattening of batch
        # and sequence, and back after attention) would be fused into one TIR copy kernel that
        # RewriteDataflowReshape cannot see as a view: 2 copy kernels per layer and step.
        relax.transform.RemoveRedundantReshape(),
        *([relax.transform.FuseTransposeMatmul()] if transpose_fusion else []),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        FuseDequantizeMatmul(),
        FuseCastsIntoNorm(),
        relax.transform.DeadCodeElimination(),
    ]


def lowering_passes(metadata: dict[str, Any] | None = None, after_memory_plan: Sequence[Any] = (),
                    kill_after_last_use: bool = True) -> list[Any]:
    """Relax passes after scheduling, down to VM code (``_metadata()`` added when given)."""
    from tvm import relax

    return [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
        *after_memory_plan,
        *([_AttachMetadata(metadata)] if metadata is not None else []),
        relax.transform.LowerAllocTensor(),
        *([relax.transform.KillAfterLastUse()] if kill_after_last_use else []),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def _annotate(key: str, value: Any, prim_funcs: bool = False, names: Sequence[str] | None = None) -> Any:
    """A module pass setting attribute ``key`` on the Relax functions (``prim_funcs``: the
    PrimFuncs) of a module, or only on those named in ``names``."""
    import tvm
    from tvm import relax, tirx

    kind = tirx.PrimFunc if prim_funcs else relax.Function

    @tvm.transform.module_pass(opt_level=0, name=f"Annotate({key})")
    def annotate(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, kind) and (names is None or gvar.name_hint in names):
                mod[gvar] = func.with_attr(key, value)
        return mod

    return annotate


def _upper_bounds(bounds: dict[str, int]) -> Any:
    """Upper bounds of the symbolic sizes let static memory planning preallocate activations."""
    return _annotate("tir_var_upper_bound", bounds, names=("prefill", "decode", "batch_prefill", "batch_decode", "embed"))


def _AttachMetadata(metadata: dict[str, Any]) -> Any:  # noqa: N802  (a pass, named like TVM's)
    """Adds ``_metadata() -> str`` (JSON) to the module."""
    import tvm
    from tvm import relax

    text = json.dumps(metadata, sort_keys=True)

    @tvm.transform.module_pass(opt_level=0, name="AttachMetadata")
    def attach(mod: tvm.IRModule, _ctx: Any) -> tvm.IRModule:
        bb = relax.BlockBuilder()
        with bb.function("_metadata", params=[]):
            bb.emit_func_output(tvm.ir.StringImm(text))
        mod["_metadata"] = bb.finalize()["_metadata"].with_attr("global_symbol", "_metadata")
        return mod

    return attach
