"""Compile a model (its chat config) for a device into a shared library: the build the compile stage
runs. Builds the architecture's Relax module with the scheme's quantized layers, exports the
functions listed in ``mlcbuild.bundle_format``, lowers it with ``compiler.pipeline`` and links it
for the device (``mlcbuild.devices`` says how).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlcbuild.bundle_format import CUDA_KERNELS_FILE, PAGE_SIZE, CudaKernels, ScheduleFallback
from mlcbuild.compiler.pipeline import relax_pipeline
from mlcbuild.devices import ROCM_MAX_THREADS_PER_BLOCK, DeviceSpec, target_dict
from mlcbuild.pipeline.stage import StageError
from mlcbuild.recipe import Kernels


def build_library(chat: dict[str, Any], device: DeviceSpec, out: Path, kernels: Kernels = Kernels(),
                  fallbacks: list[ScheduleFallback] | None = None) -> dict[str, Any]:
    """Compile the model a chat config describes for ``device`` into the library file ``out`` (the
    device kind's ``library.file`` inside the compile node's output), with the kernel switches
    ``kernels``; every kernel schedule that failed and fell back is added to ``fallbacks``. CUDA's
    fatbin lands beside it (the GPU code of other kinds is inside the library). Returns the metadata
    embedded in the library."""
    import tvm

    from mlcbuild.models import config_from_normalized
    from mlcbuild.models.base_nn import build_quantized_model

    kind = device.spec
    with _native_stderr_without(ROCM_NO_GPU_WARNINGS if device.kind == "rocm" else ()):
        target = tvm.target.Target(target_dict(device))
    config = config_from_normalized(chat["model_config"])
    if chat["sliding_window_size"] > 0:  # the window the runtime slides by (a recipe may override the model's)
        config = config.model_copy(update={"sliding_window": chat["sliding_window_size"]})
    shards = int(chat.get("tensor_parallel_shards", 1))
    model, _ = build_quantized_model(config, chat["quantization"], target, shards)
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    metadata = {
        "model_type": chat["model_type"],
        "quantization": chat["quantization"],
        "model_dtype": chat["model_dtype"],
        "context_window_size": chat["context_window_size"],
        "prefill_chunk_size": chat["prefill_chunk_size"],
        "sliding_window_size": chat["sliding_window_size"],
        "max_batch_size": chat["max_batch_size"],
        # the chat config's page size (gen_config writes bundle_format.PAGE_SIZE): library and
        # runtime read the one value the bundle carries
        "page_size": chat.get("page_size", PAGE_SIZE),
        "kv_cache": {  # one shard's
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads // shards,
            "num_key_value_heads": max(config.num_key_value_heads // shards, 1),
            "head_dim": config.head_dim,
        },
        "params": [
            {"name": name, "shape": [int(s) for s in p.shape], "dtype": str(p.dtype)} for name, p in named_params
        ],
    }
    if shards > 1:
        # the library is one shard's model: the runtime runs a copy per shard (disco workers), each with
        # its own weights (convert_weight's rank) and KV heads, joined by all-reduces
        metadata["tensor_parallel_shards"] = shards
    # verify_len: tokens of one speculative verification call; the engine keeps them within a prefill chunk
    bounds = {"seq_len": chat["prefill_chunk_size"], "batch_size": chat["max_batch_size"],
              "verify_len": chat["prefill_chunk_size"]}
    # CUDA: decode steps replay CUDA graphs (RewriteCUDAGraph, in the pipeline) instead of
    # launching each of the ~10 kernels per layer from the host.
    pass_config = {"tirx.disable_cse_tir": True, "relax.backend.use_cuda_graph": device.kind == "cuda"}
    # A library linked into an app (iOS, Android) registers its functions in the app's system
    # library under a prefix, so that several models can live in one app (as MLC LLM's do).
    system_lib = kind.library.name == "static-tar"
    if system_lib:
        metadata["system_lib_prefix"] = system_lib_prefix(chat)
        mod = mod.with_attr("system_lib_prefix", metadata["system_lib_prefix"])
    with target, tvm.transform.PassContext(config=pass_config), _device_callbacks(device):
        executable = tvm.relax.build(mod, target, relax_pipeline=relax_pipeline(target, metadata, bounds, kernels, fallbacks),
                                     system_lib=system_lib or None)
    out.parent.mkdir(parents=True, exist_ok=True)
    _export(executable, device, out)
    if device.kind == "cuda":
        from mlcbuild.devices import CUDA_MULTI_ARCHS

        with target:  # tvm's nvcc wrapper reads the arch from the current target
            metadata["cuda"] = precompile_cuda(executable.mod, [device.arch] if device.arch else list(CUDA_MULTI_ARCHS),
                                               out.parent)
    return metadata


def system_lib_prefix(chat: dict[str, Any]) -> str:
    """The symbol prefix of a system-library build: the model type and quantization (what tells two
    models of one app apart), as a C identifier."""
    return "".join(c if c.isalnum() else "_" for c in f"{chat['model_type']}_{chat['quantization']}") + "_"


def _export(executable: Any, device: DeviceSpec, out: Path) -> None:
    """Link the executable into ``out`` as the device kind's library format (temp name, then rename)."""
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fmt = device.spec.library.name
    if device.kind == "aarch64":
        from tvm.support import cc

        # host code generated by TVM's LLVM for aarch64; linked by the cross linker (gcc's driver)
        executable.export_library(str(tmp), fcompile=cc.cross_compiler("aarch64-linux-gnu-gcc"))
    elif fmt == "macho-dylib":
        executable.export_library(str(tmp), fcompile=_link_macos_dylib)
    elif fmt == "wasm":
        from mlcbuild.compiler.web import link_tvmjs_wasm

        executable.export_library(str(tmp), fcompile=link_tvmjs_wasm)
    elif fmt == "static-tar":
        executable.export_library(str(tmp))  # a .tar: the object files, unlinked
        _normalize_tar(tmp)
        if device.kind == "android":
            _check_android_link(tmp)
    else:
        executable.export_library(str(tmp))
    os.replace(tmp, out)


def _normalize_tar(path: Path) -> None:
    """Rewrite TVM's tar (the ``tar`` command's: build times, user names) with sorted members,
    mtime 0 and uid/gid 0, so two builds give the same bytes."""
    import io
    import tarfile

    with tarfile.open(path) as src:
        members = sorted(((m, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()),  # type: ignore[union-attr]
                         key=lambda item: item[0].name)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as dst:
        for member, data in members:
            info = tarfile.TarInfo(Path(member.name).name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
            dst.addfile(info, io.BytesIO(data))
    path.write_bytes(buffer.getvalue())


def _link_macos_dylib(output: str, objects: list[str], options: Any = None) -> None:
    """Link arm64 Mach-O objects into a macOS dylib with LLVM's ld64.lld. Symbols of TVM's runtime
    and libSystem stay undefined, bound when the library is loaded into a process that has them
    (as a Python extension module is); no macOS SDK is needed. ``-S``: no debug stabs, which would name
    TVM's temporary object files (a new path each build)."""
    import subprocess

    from mlcbuild.toolchain import tool_command

    cmd = [tool_command("ld64.lld") or "ld64.lld", "-dylib", "-arch", "arm64", "-platform_version", "macos", "11.0", "11.0",
           "-undefined", "dynamic_lookup", "-install_name", "@rpath/model.dylib", "-S", "-o", output, *objects]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise StageError(f"ld64.lld failed linking the macOS library:\n{done.stderr.strip()}")


_link_macos_dylib.object_format = "o"  # type: ignore[attr-defined]


def _check_android_link(tar: Path) -> None:
    """Link the tar's objects into a throwaway shared object with the NDK's clang: what the app's
    build does with them, so an object the NDK cannot link fails here, not in the app build."""
    import subprocess
    import tarfile
    import tempfile

    from mlcbuild.devices import android_ndk_clang

    clang = android_ndk_clang()
    if clang is None:
        raise StageError("android: the NDK's aarch64 clang is not under $ANDROID_NDK/toolchains/llvm/prebuilt/*/bin")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tar) as archive:
            archive.extractall(tmp, filter="data")
        objects = sorted(str(p) for p in Path(tmp).rglob("*.o"))
        done = subprocess.run([str(clang), "-shared", "-Wl,--unresolved-symbols=ignore-all", "-o",
                               str(Path(tmp) / "check.so"), *objects], capture_output=True, text=True)
        if done.returncode != 0:
            raise StageError(f"android: the NDK's clang cannot link the library's objects:\n{done.stderr.strip()}")


class _device_callbacks:
    """TVM hooks a device's code generator calls, pointed at what this machine has (ROCm: the
    device library bitcode Debian's rocm-device-libs installs, linked with ld.lld)."""

    def __init__(self, device: DeviceSpec):
        self.device = device
        self.previous: Any = None

    def __enter__(self) -> "_device_callbacks":
        if self.device.kind == "rocm":
            import tvm_ffi
            from tvm.support import rocm

            from mlcbuild.devices import DEVICE_KINDS
            from mlcbuild.toolchain import tool_command

            lld_tool = DEVICE_KINDS["rocm"].tools[0]
            lld = tool_command(lld_tool.command, lld_tool.min_version)
            if lld is None:
                raise StageError(f"rocm: no ld.lld of version {lld_tool.min_version}+: {lld_tool.install}")
            directory = rocm_bitcode_dir()

            def bitcode_path(rocdl_dir: Any = None) -> Any:
                return rocm.callback_rocm_bitcode_path(str(directory))

            def link(obj: Any) -> bytearray:
                import tempfile

                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "kernels.o").write_bytes(bytes(obj))
                    rocm.rocm_link(str(Path(tmp) / "kernels.o"), str(Path(tmp) / "kernels.co"), lld=lld)
                    return bytearray((Path(tmp) / "kernels.co").read_bytes())

            codegen = tvm_ffi.get_global_func("target.build.rocm")

            def build_rocm(mod: Any, target: Any) -> Any:
                too_wide = [f"{name} ({threads} threads)" for name, threads in sorted(_rocm_block_threads(mod).items())
                            if threads > ROCM_MAX_THREADS_PER_BLOCK]
                if too_wide:  # each would fail to launch on the GPU (see ROCM_MAX_THREADS_PER_BLOCK)
                    raise StageError(
                        f"rocm: {len(too_wide)} kernel(s) launch more than the {ROCM_MAX_THREADS_PER_BLOCK} threads per "
                        f"block TVM's AMDGPU code object allows when built without an AMD GPU: {', '.join(too_wide[:8])}")
                with _native_stderr_without(ROCM_NO_GPU_WARNINGS):
                    return codegen(mod, target)

            self.previous = {name: tvm_ffi.get_global_func(name, allow_missing=True)
                             for name in ("tvm_callback_rocm_bitcode_path", "tvm_callback_rocm_link", "target.build.rocm")}
            tvm_ffi.register_global_func("tvm_callback_rocm_bitcode_path", bitcode_path, override=True)
            tvm_ffi.register_global_func("tvm_callback_rocm_link", link, override=True)
            tvm_ffi.register_global_func("target.build.rocm", build_rocm, override=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous:
            import tvm_ffi

            for name, func in self.previous.items():
                if func is not None:
                    tvm_ffi.register_global_func(name, func, override=True)


# What TVM prints on a machine without an AMD GPU, once per kernel: it then assumes ROCm >= 3.5 and
# 256 threads per block, which the rocm target's schedules keep to (and build_rocm checks).
ROCM_NO_GPU_WARNINGS = ("Cannot get maximum number of threads for AMD codegen", "Unable to detect ROCm version")


def _rocm_block_threads(mod: Any) -> dict[str, int]:
    """Each device kernel of ``mod`` (lowered TIR) -> threads per block (product of its constant
    threadIdx extents)."""
    from tvm import tirx

    def extents(stmt: Any, found: dict[str, int]) -> None:
        if isinstance(stmt, tirx.AttrStmt) and stmt.attr_key == "thread_extent":
            tag = stmt.node.thread_tag
            if tag.startswith("threadIdx") and isinstance(stmt.value, tirx.IntImm):
                found[tag] = int(stmt.value)
        if isinstance(stmt, tirx.SeqStmt):
            for child in stmt.seq:
                extents(child, found)
        for field in ("body", "then_case", "else_case"):
            child = getattr(stmt, field, None)
            if isinstance(child, tirx.Stmt):
                extents(child, found)

    threads = {}
    for gvar, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            found: dict[str, int] = {}
            extents(func.body, found)
            total = 1
            for value in found.values():
                total *= value
            threads[gvar.name_hint] = total
    return threads


@contextlib.contextmanager
def _native_stderr_without(lines: tuple[str, ...]) -> Any:
    """Drop the native (C++) stderr lines containing any of ``lines`` while the block runs; the rest
    is written out again afterwards. TVM logs through file descriptor 2, past Python's sys.stderr."""
    if not lines:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not any(text in line for text in lines)]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def rocm_bitcode_dir() -> Path:
    """ROCm's device library bitcode (ocml, ockl, ...): $ROCM_PATH/amdgcn/bitcode, /opt/rocm, or
    Debian's rocm-device-libs."""
    candidates = [Path(os.environ["ROCM_PATH"]) / "amdgcn" / "bitcode"] if os.environ.get("ROCM_PATH") else []
    candidates += [Path("/opt/rocm/amdgcn/bitcode"), Path("/usr/lib/x86_64-linux-gnu/amdgcn/bitcode")]
    for candidate in candidates:
        if (candidate / "ocml.bc").is_file():
            return candidate
    raise StageError("ROCm's device libraries (ocml.bc) are missing: apt-get install rocm-device-libs, "
                     "or set ROCM_PATH to a ROCm installation")


def precompile_cuda(module: Any, archs: str | list[str], directory: Path) -> dict[str, str]:
    """Compile the library's CUDA kernels with nvcc, ahead of time.

    TVM 0.27 keeps CUDA *source* in the library and compiles it when the library is loaded
    (its ``tvm_callback_cuda_compile`` hook, NVRTC by default). We build the fatbin here
    instead (SASS for each of ``archs`` plus PTX of the newest, for newer GPUs) and write it next
    to the library with the SHA-256 of the source it was built from; a runtime registers a
    ``tvm_callback_cuda_compile`` that returns this fatbin when the source's hash matches (see
    .notes/compiler.md), so loading needs neither NVRTC nor nvcc and compile errors surface
    at build time.
    """
    from tvm.support import nvcc as tvm_nvcc

    archs = [archs] if isinstance(archs, str) else list(archs)
    source = _find_source(module, "cuda")
    if source is None:
        raise StageError("the CUDA build produced no CUDA module")
    gencode: list[str] = []
    for arch in archs:
        num = arch.removeprefix("sm_")
        gencode += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
    newest = archs[-1].removeprefix("sm_")
    gencode += ["-gencode", f"arch=compute_{newest},code=compute_{newest}"]
    fatbin = tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=gencode, compiler="nvcc")
    name = f"model.{archs[0]}.fatbin" if len(archs) == 1 else "model.cuda.fatbin"
    (directory / name).write_bytes(bytes(fatbin))
    info = CudaKernels(arch=",".join(archs), fatbin=name, source_sha256=hashlib.sha256(source.encode()).hexdigest())
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
