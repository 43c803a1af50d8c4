"""Devices as recipes spell them, and one registry of device kinds: adding a device is one entry.

A recipe's ``devices:`` names ``KIND`` or ``KIND:ARCH`` (``cpu``, ``cpu:x86-64-v3``, ``aarch64:neoverse-v1``,
``cuda``, ``cuda:sm_90``, ``rocm:gfx942``, ``metal``, ``ios``, ``webgpu``, ``vulkan``, ``android``). Each
:class:`DeviceKind` says, as data:

* how its ARCH is written and checked (``arch``),
* the TVM target (a JSON dict: TVM 0.27 refuses the string form) for an arch (``target``),
* which kernel schedules it gets (``kernels``: the cpu family, CUDA's own, or the generic GPU ones),
* the library the bundle holds and what loads it (``library``: a ``bundle_format.LibraryFormat``),
* the tools it needs on the build machine, how to install each, and the version facts that enter
  the compile node's key (``tools``, ``toolchain_facts``),
* what can be missing here (the TVM code generator, an SDK), found by :func:`build_problems`.

Nothing here imports tvm at import time: recipe loading and planning stay fast. Facts that need
tvm or a tool's ``--version`` are memoized per tool identity (``mlcbuild.toolchain.memo``).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict

from mlcbuild import bundle_format as bf

# ---- how a device's ARCH is written ---------------------------------------------------------------

# ROCm: the gfx targets we build for, with their wavefront size (gfx9 data-center GPUs run 64-wide
# waves; RDNA runs 32-wide by default, which LLVM compiles for): TVM's warp reductions must know it.
ROCM_ARCHS: dict[str, int] = {
    "gfx908": 64, "gfx90a": 64, "gfx940": 64, "gfx941": 64, "gfx942": 64, "gfx950": 64,
    "gfx1030": 32, "gfx1100": 32, "gfx1101": 32, "gfx1102": 32, "gfx1200": 32, "gfx1201": 32,
}
# `cuda` with no arch: one library for every GPU since Turing, as MLC LLM's users asked (its issues
# #1020, #994: CUDA_ERROR_NO_BINARY_FOR_GPU): SASS for these archs plus PTX of the newest, which the
# driver compiles for GPUs newer than all of them.
CUDA_MULTI_ARCHS = bf.CUDA_MULTI_ARCHS
_SM = re.compile(r"^sm_(?P<num>[0-9]{2,3})(?P<suffix>[af]?)$")
_MCPU = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_NAME = re.compile(r"^(?P<kind>[a-z0-9]+)(?::(?P<arch>.*))?$")


class DeviceSpec(BaseModel):
    """A parsed device: its kind (a key of :data:`DEVICE_KINDS`) and arch (None: the kind's default)."""

    model_config = ConfigDict(frozen=True)

    kind: str
    arch: str | None = None  # mcpu for cpu/aarch64 (None = host / generic), "sm_90" for cuda, "gfx942" for rocm

    @property
    def name(self) -> str:
        return self.kind if self.arch is None else f"{self.kind}:{self.arch}"

    @property
    def dirname(self) -> str:
        """The device as a file-name component (no colon)."""
        return bf.device_dirname(self.name)

    @property
    def spec(self) -> "DeviceKind":
        return DEVICE_KINDS[self.kind]


@dataclass(frozen=True)
class Tool:
    """An executable the build runs, how to get it, and the key fact its version gives."""

    command: str  # looked up on PATH
    install: str  # what to run or get when it is missing
    fact: str  # name of the toolchain fact (in the compile node's key)
    version_args: tuple[str, ...] = ("--version",)
    version_line: int = 0  # which line of the version output is the fact (-1: the last)
    min_version: int = 0  # only Debian's versioned names (ld.lld-19) of at least this version
    resource: bool = True  # a custom resource a cluster worker must advertise (not for tools every host has)


@dataclass(frozen=True)
class DataFile:
    """A file the build reads (one of ``candidates``), how to get it, and the key fact naming it."""

    candidates: tuple[str, ...]  # absolute paths; "$VAR/..." expands an environment variable
    install: str
    fact: str

    def find(self) -> Path | None:
        for candidate in self.candidates:
            path = Path(os.path.expandvars(candidate))
            if "$" not in str(path) and path.is_file():
                return path
        return None


@dataclass(frozen=True)
class DeviceKind:
    """One kind of device: everything compile, package, plan, doctor and the README need about it."""

    name: str
    summary: str  # what it is for, one line
    arch: Literal["none", "optional", "required"]
    arch_help: str  # how ARCH is written, for errors ("rocm:<gfx>, one of ...")
    target: Callable[[str | None], dict[str, Any]]  # arch -> TVM target dict
    kernels: Literal["cpu", "cuda", "gpu"]  # the schedule family (compiler.pipeline)
    library: bf.LibraryFormat
    host: str  # the CPU side the library is for: bf.LibraryInfo.host
    gpu: str | None  # the GPU API its kernels use (None: the CPU runs them)
    loads_with: str  # what loads the library, on what (the manifest and the README say it)
    codegen: str | None = None  # the TVM code generator it needs ("target.build.<codegen>")
    tools: tuple[Tool, ...] = ()
    files: tuple["DataFile", ...] = ()  # files the build reads besides tools (ROCm's device libraries)
    env: str | None = None  # an environment variable naming an SDK it needs (android: ANDROID_NDK)
    env_help: str = ""
    check_arch: Callable[[str], str | None] | None = None  # arch -> what is wrong with it, or None
    extra_facts: Callable[[str | None], dict[str, str]] = field(default=lambda arch: {})

    def parse(self, arch: str | None) -> DeviceSpec:
        if arch is None and self.arch == "required":
            raise ValueError(f"{self.name} needs an arch: {self.arch_help}")
        if arch is not None and self.arch == "none":
            raise ValueError(f"{self.name} takes no arch ({self.name}:{arch} given): write {self.arch_help}")
        if arch is not None and self.check_arch is not None:
            problem = self.check_arch(arch)
            if problem:
                raise ValueError(f"{self.name}:{arch}: {problem}; expected {self.arch_help}")
        return DeviceSpec(kind=self.name, arch=arch)


# ---- targets ---------------------------------------------------------------------------------------


def _cpu_target(arch: str | None) -> dict[str, Any]:
    from mlcbuild.toolchain import host_cpu

    return {"kind": "llvm", "mcpu": arch or host_cpu()}


def _aarch64_target(arch: str | None) -> dict[str, Any]:
    # "generic" ARMv8-A: NEON, no dot-product or SVE assumptions; name a CPU for more.
    return {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": arch or "generic"}


def _cuda_target(arch: str | None) -> dict[str, Any]:
    # Limits every CUDA GPU since sm_50 meets (the 48 KiB static shared memory any kernel may
    # use); the host side stays generic x86-64 so the library loads on any server CPU. Without an
    # arch the kernels are generated for the oldest of CUDA_MULTI_ARCHS and compiled for all.
    return {
        "kind": "cuda",
        "arch": arch or CUDA_MULTI_ARCHS[0],
        "max_shared_memory_per_block": 49152,
        "max_threads_per_block": 1024,
        "thread_warp_size": 32,
        "host": {"kind": "llvm"},
    }


# TVM's AMDGPU code generator stamps every kernel "amdgpu-flat-work-group-size"="1,N", N asked of
# a ROCm GPU present at build time, else 256 (with a warning per kernel). Artifacts are built on
# machines without one (CI), and a kernel launched with more threads than its code object allows
# fails on the GPU: the schedules must launch at most those 256.
ROCM_MAX_THREADS_PER_BLOCK = 256


def _rocm_target(arch: str | None) -> dict[str, Any]:
    assert arch is not None
    return {
        "kind": "rocm",
        "mcpu": arch,
        "mtriple": "amdgcn-amd-amdhsa-hcc",
        "max_shared_memory_per_block": 65536,
        "max_threads_per_block": ROCM_MAX_THREADS_PER_BLOCK,
        "max_num_threads": ROCM_MAX_THREADS_PER_BLOCK,
        "thread_warp_size": ROCM_ARCHS[arch],
        "host": {"kind": "llvm"},
    }


def _metal_target(host: dict[str, Any], threads: int, warp: int) -> Callable[[str | None], dict[str, Any]]:
    def target(arch: str | None) -> dict[str, Any]:
        return {"kind": "metal", "max_threads_per_block": threads, "max_shared_memory_per_block": 32768,
                "thread_warp_size": warp, "host": host}

    return target


def _webgpu_target(arch: str | None) -> dict[str, Any]:
    # maxComputeInvocationsPerWorkgroup 256 (what WebGPU guarantees every adapter); 32 KiB of
    # workgroup storage, TVM's default: TVM's paged-KV attention kernels for a 64-wide f16 head (tree
    # attention: 16.6 KiB) do not fit WebGPU's guaranteed 16 KiB, so the page must ask the adapter for
    # its maxComputeWorkgroupStorageSize (32 KiB on desktop GPUs), as WebLLM does; no subgroups.
    return {"kind": "webgpu", "max_num_threads": 256, "max_shared_memory_per_block": 32768,
            "host": {"kind": "llvm", "mtriple": "wasm32-unknown-unknown-wasm"}}


def _vulkan_target(arch: str | None) -> dict[str, Any]:
    return {"kind": "vulkan", "max_threads_per_block": 256, "max_shared_memory_per_block": 32768,
            "thread_warp_size": 1, "supports_float16": True, "supports_int64": True,
            "host": {"kind": "llvm"}}


ANDROID_API = 24  # Android 7: the oldest MLC LLM's app supports


def _android_target(arch: str | None) -> dict[str, Any]:
    return {"kind": "opencl", "max_threads_per_block": 256, "max_shared_memory_per_block": 16384,
            "thread_warp_size": 1, "host": {"kind": "llvm", "mtriple": f"aarch64-linux-android{ANDROID_API}"}}


# ---- arch checks -----------------------------------------------------------------------------------


def _llvm_cpu_problem(triple: str, what: str) -> Callable[[str], str | None]:
    def check(arch: str) -> str | None:
        if not _MCPU.match(arch):
            return "not a CPU name"
        if triple.startswith("x86_64") and arch.lower() in ("aarch64", "arm64", "arm", "armv8", "armv9"):
            return f"{arch!r} is not an x86-64 CPU: for 64-bit Arm write aarch64 (or aarch64:<mcpu>)"
        if triple.startswith("x86_64") and _llvm_knows_cpu(arch, "aarch64-linux-gnu") and not _llvm_knows_cpu(arch, triple):
            return f"{arch!r} is an Arm CPU: write aarch64:{arch} (cpu:<mcpu> is this host's kind, x86-64)"
        if not _llvm_knows_cpu(arch, triple):
            return f"LLVM does not know the {what} CPU {arch!r}"
        return None

    return check


@functools.lru_cache(maxsize=None)
def _llvm_knows_cpu(name: str, triple: str) -> bool:
    """LLVM's (TVM's) answer, memoized per TVM version: a recipe is checked without importing tvm."""
    from mlcbuild.toolchain import memo, tvm_probe, tvm_version

    return memo(f"llvm-cpu\n{tvm_version()}\n{triple}\n{name}", lambda: tvm_probe("llvm-valid-cpu", name, triple)) == "1"


def _cuda_arch_problem(arch: str) -> str | None:
    m = _SM.match(arch)
    if not m:
        return "not a CUDA compute capability"
    if int(m.group("num")) < 50:
        return "GPUs before sm_50 are not supported by CUDA 12"
    return None


def _rocm_arch_problem(arch: str) -> str | None:
    return None if arch in ROCM_ARCHS else "not a ROCm GPU target mlcbuild builds for"


# ---- toolchain facts -------------------------------------------------------------------------------


def _cuda_facts(arch: str | None) -> dict[str, str]:
    return {} if arch else {"cuda_archs": ",".join(CUDA_MULTI_ARCHS) + f"+compute_{CUDA_MULTI_ARCHS[-1][3:]}"}


def _webgpu_facts(arch: str | None) -> dict[str, str]:
    from mlcbuild.compiler.web import sources_digest  # TVM web runtime headers we ship (no tvm import)

    return {"tvmjs_sources": sources_digest()}


def _android_facts(arch: str | None) -> dict[str, str]:
    return {"android_ndk": android_ndk_revision() or "absent", "android_api": str(ANDROID_API)}


def android_ndk_revision() -> str | None:
    """``Pkg.Revision`` of the NDK at $ANDROID_NDK (None when unset or not an NDK)."""
    root = os.environ.get("ANDROID_NDK")
    if not root:
        return None
    try:
        text = (Path(root) / "source.properties").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"^Pkg\.Revision\s*=\s*(\S+)", text, re.M)
    return m.group(1) if m else None


def android_ndk_clang() -> Path | None:
    """The NDK's clang for aarch64 Android (the linker of MLC LLM's Android app)."""
    root = os.environ.get("ANDROID_NDK")
    if not root:
        return None
    for found in sorted(Path(root).glob(f"toolchains/llvm/prebuilt/*/bin/aarch64-linux-android{ANDROID_API}-clang")):
        return found
    return None


# ---- the registry ----------------------------------------------------------------------------------

# the host linker TVM's export_library runs for x86-64 libraries (its get_cc: $CXX, g++, clang++, c++ ...)
_CXX = Tool("c++", "apt-get install g++", "cxx", resource=False)
_CC_AARCH64 = Tool("aarch64-linux-gnu-gcc", "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross", "cc")
_AARCH64_LIBC = DataFile(("/usr/aarch64-linux-gnu/lib/crti.o",), "apt-get install libc6-dev-arm64-cross", "aarch64_libc")
# AMDGPU code objects from TVM's LLVM (22) need an lld that knows their ABI version (17+)
_LLD = Tool("ld.lld", "apt-get install lld-19", "lld", min_version=17)
_LD64 = Tool("ld64.lld", "apt-get install lld-19", "ld64")
_NVCC = Tool("nvcc", "the CUDA toolkit (apt-get install nvidia-cuda-toolkit, or NVIDIA's cuda-nvcc)", "nvcc",
             version_line=-1)
_EMCC = Tool("emcc", "apt-get install emscripten", "emcc")

# ROCm's device libraries (ocml, ockl: the math functions AMDGPU kernels call), as compiler.build finds them.
_ROCM_BITCODE = DataFile(("$ROCM_PATH/amdgcn/bitcode/ocml.bc", "/opt/rocm/amdgcn/bitcode/ocml.bc",
                          "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode/ocml.bc"),
                         "apt-get install rocm-device-libs (or set ROCM_PATH to a ROCm installation)", "rocm_device_libs")

_MACOS_HOST = {"kind": "llvm", "mtriple": "arm64-apple-macos11.0", "mcpu": "apple-m1"}
_IOS_HOST = {"kind": "llvm", "mtriple": "arm64-apple-ios14.0", "mcpu": "apple-a12"}

DEVICE_KINDS: dict[str, DeviceKind] = {kind.name: kind for kind in (
    DeviceKind(
        "cpu", "this host's kind of CPU (x86-64 Linux); cpu:<mcpu> for a named CPU or x86-64 level",
        arch="optional", arch_help="cpu or cpu:<mcpu> (e.g. cpu:x86-64-v3, cpu:znver4)",
        target=_cpu_target, kernels="cpu", library=bf.LIBRARY_FORMATS["elf-shared"], host="x86_64-linux", gpu=None,
        loads_with="mlcbuild (chat, serve, MLCEngine) on x86-64 Linux", tools=(_CXX,),
        check_arch=_llvm_cpu_problem("x86_64-linux-gnu", "x86-64"),
    ),
    DeviceKind(
        "aarch64", "64-bit Arm Linux CPUs (Graviton, Ampere, Grace, Jetson, Raspberry Pi 5)",
        arch="optional", arch_help="aarch64 or aarch64:<mcpu> (e.g. aarch64:neoverse-v1, aarch64:cortex-a76)",
        target=_aarch64_target, kernels="cpu", library=bf.LIBRARY_FORMATS["elf-shared"], host="aarch64-linux",
        gpu=None, loads_with="mlcbuild (chat, serve, MLCEngine) on aarch64 Linux, with the aarch64 apache-tvm wheel",
        tools=(_CC_AARCH64,), files=(_AARCH64_LIBC,), check_arch=_llvm_cpu_problem("aarch64-linux-gnu", "aarch64"),
    ),
    DeviceKind(
        "cuda", "NVIDIA GPUs: cuda for every GPU since sm_75 (SASS + PTX), cuda:sm_XY for one arch",
        arch="optional", arch_help="cuda or cuda:sm_XY (e.g. cuda:sm_80, cuda:sm_90)",
        target=_cuda_target, kernels="cuda", library=bf.LIBRARY_FORMATS["elf-shared"], host="x86_64-linux",
        gpu="cuda", loads_with="mlcbuild (chat, serve, MLCEngine) on x86-64 Linux with an NVIDIA GPU and driver",
        codegen="cuda", tools=(_NVCC, _CXX), check_arch=_cuda_arch_problem, extra_facts=_cuda_facts,
    ),
    DeviceKind(
        "rocm", "AMD GPUs (Instinct MI200/MI300, Radeon RX 7000) on Linux with ROCm",
        arch="required", arch_help="rocm:<gfx>, one of " + ", ".join(ROCM_ARCHS),
        target=_rocm_target, kernels="gpu", library=bf.LIBRARY_FORMATS["elf-shared"], host="x86_64-linux",
        gpu="rocm", loads_with="a TVM runtime built with ROCm (MLC LLM's ROCm wheels) on x86-64 Linux with that AMD GPU",
        codegen="rocm", tools=(_LLD, _CXX), files=(_ROCM_BITCODE,), check_arch=_rocm_arch_problem,
    ),
    DeviceKind(
        "metal", "Apple silicon Macs (macOS 11+), Metal kernels",
        arch="none", arch_help="metal",
        target=_metal_target(_MACOS_HOST, 1024, 32), kernels="gpu", library=bf.LIBRARY_FORMATS["macho-dylib"],
        host="arm64-macos", gpu="metal",
        loads_with="MLC LLM on macOS (model_lib = lib/model.dylib), or any Metal-enabled TVM 0.27 runtime",
        codegen="metal", tools=(_LD64,),
    ),
    DeviceKind(
        "ios", "iPhone and iPad (iOS 14+), Metal kernels, linked into the app",
        arch="none", arch_help="ios",
        target=_metal_target(_IOS_HOST, 256, 1), kernels="gpu", library=bf.LIBRARY_FORMATS["static-tar"],
        host="arm64-ios", gpu="metal",
        loads_with="an iOS app with TVM's runtime (MLC LLM's MLCChat): link the objects of lib/model.tar into it",
        codegen="metal",
    ),
    DeviceKind(
        "webgpu", "browsers with WebGPU (WebLLM): a wasm host module and WGSL kernels",
        arch="none", arch_help="webgpu",
        target=_webgpu_target, kernels="gpu", library=bf.LIBRARY_FORMATS["wasm"], host="wasm32", gpu="webgpu",
        loads_with="WebLLM (@mlc-ai/web-llm) in a browser with WebGPU: model_lib = lib/model.wasm, weights over HTTP",
        codegen="webgpu", tools=(_EMCC,), extra_facts=_webgpu_facts,
    ),
    DeviceKind(
        "vulkan", "Vulkan GPUs (Steam Deck, Intel/AMD/NVIDIA on Linux and Windows), SPIR-V kernels",
        arch="none", arch_help="vulkan",
        target=_vulkan_target, kernels="gpu", library=bf.LIBRARY_FORMATS["elf-shared"], host="x86_64-linux",
        gpu="vulkan", loads_with="a TVM runtime built with Vulkan (MLC LLM's Vulkan builds) on Linux",
        codegen="vulkan", tools=(_CXX,),
    ),
    DeviceKind(
        "android", "Android phones (arm64, OpenCL GPUs: Adreno, Mali), linked into the app",
        arch="none", arch_help="android",
        target=_android_target, kernels="gpu", library=bf.LIBRARY_FORMATS["static-tar"], host="aarch64-android",
        gpu="opencl", loads_with="an Android app with TVM's runtime (MLC LLM's mlc4j): link lib/model.tar with the NDK",
        codegen="opencl", env="ANDROID_NDK", extra_facts=_android_facts,
        env_help="the Android NDK (r26 or newer): download it from https://developer.android.com/ndk/downloads "
                 "or `sdkmanager 'ndk;27.2.12479018'`, and set ANDROID_NDK to its directory (Debian has no package)",
    ),
)}

DEVICE_KIND_NAMES = tuple(DEVICE_KINDS)


def parse_device(text: str) -> DeviceSpec:
    """``KIND`` or ``KIND:ARCH`` -> DeviceSpec; ValueError saying what was expected."""
    m = _NAME.match(text.strip()) if isinstance(text, str) else None
    kind = DEVICE_KINDS.get(m.group("kind")) if m else None
    if kind is None:
        raise ValueError(f"{text!r} is not a known device; expected one of: "
                         + "; ".join(k.arch_help.split(" (e.g.")[0].split(", one of")[0] for k in DEVICE_KINDS.values()))
    return kind.parse(m.group("arch"))


def target_dict(device: DeviceSpec) -> dict[str, Any]:
    """The TVM 0.27 target (a JSON dict: the string form is refused) for a device."""
    return device.spec.target(device.arch)


# ---- what this machine can build -------------------------------------------------------------------


def tvm_codegens() -> frozenset[str]:
    """The device code generators of the installed TVM (``target.build.<name>``), memoized per TVM
    version (asking imports tvm: a second)."""
    from mlcbuild.toolchain import memo, tvm_probe, tvm_version

    names = ("llvm", "cuda", "rocm", "metal", "webgpu", "vulkan", "opencl", "nvptx")
    return frozenset(json.loads(memo(f"tvm-codegens\n{tvm_version()}\n{' '.join(names)}",
                                     lambda: tvm_probe("codegens", *names))))


def build_problems(device: DeviceSpec | str) -> list[str]:
    """What this machine lacks to build ``device``, each naming what to install (empty: it can)."""
    from mlcbuild.toolchain import tool_path

    device = parse_device(device) if isinstance(device, str) else device
    kind = device.spec
    problems = []
    if kind.codegen is not None and kind.codegen not in tvm_codegens():
        from mlcbuild.toolchain import tvm_version

        problems.append(
            f"the installed TVM (apache-tvm {tvm_version()}) has no {kind.codegen} code generator "
            f"(target.build.{kind.codegen}): the PyPI wheel is built without it; build TVM from source with "
            f"-DUSE_{kind.codegen.upper()}=ON (https://tvm.apache.org/docs/install/from_source.html; Vulkan also needs "
            "the Vulkan SDK headers and loader: apt-get install libvulkan-dev spirv-headers spirv-tools) and "
            "install its Python package in place of apache-tvm")
    for tool in kind.tools:
        if tool_path(tool.command, tool.min_version) is None:
            newer = f" (version {tool.min_version} or newer)" if tool.min_version else ""
            problems.append(f"{tool.command}{newer} is not on PATH: {tool.install}")
    for data in kind.files:
        if data.find() is None:
            problems.append(f"{Path(data.candidates[-1]).name} is missing: {data.install}")
    if kind.env is not None and (not os.environ.get(kind.env) or android_ndk_revision() is None):
        where = os.environ.get(kind.env)
        state = f"${kind.env}={where} is not an NDK (no source.properties)" if where else f"${kind.env} is not set"
        problems.append(f"{state}: {kind.name} needs {kind.env_help}")
    return [f"{device.name}: {p}" for p in problems]


def toolchain_facts(device: DeviceSpec) -> dict[str, str]:
    """The facts of this machine's tools that shape ``device``'s library: the compile key's share
    of the toolchain (tvm version and target first; then each tool's version)."""
    from mlcbuild.toolchain import tool_version, tvm_version

    facts = {"tvm": tvm_version(), "target": json.dumps(target_dict(device), sort_keys=True)}
    for tool in device.spec.tools:
        facts[tool.fact] = tool_version(tool.command, tool.version_args, tool.version_line, tool.min_version)
    for data in device.spec.files:
        found = data.find()
        facts[data.fact] = file_fact(found) if found else "absent"
    facts.update(device.spec.extra_facts(device.arch))
    return facts


def file_fact(path: Path) -> str:
    """A data file as a key fact: its resolved path and sha256 (memoized by size and mtime)."""
    import hashlib

    from mlcbuild.toolchain import memo

    real = path.resolve()
    stat = real.stat()
    return memo(f"file-sha256\n{real}\n{stat.st_size}\n{stat.st_mtime_ns}",
                lambda: f"{real} sha256:{hashlib.sha256(real.read_bytes()).hexdigest()}")


def library_info(device: DeviceSpec, tvm: str) -> bf.LibraryInfo:
    """What the manifest says about a library built for ``device`` with TVM ``tvm``."""
    kind = device.spec
    archs: list[str] = []
    ptx = None
    if kind.name == "cuda":
        archs = [device.arch] if device.arch else list(CUDA_MULTI_ARCHS)
        ptx = f"compute_{archs[-1][3:]}"
    elif kind.name == "rocm":
        archs = [device.arch or ""]
    return bf.LibraryInfo(
        file=kind.library.file, format=kind.library.name, host=kind.host, gpu=kind.gpu, gpu_archs=archs, ptx=ptx,
        runtime_abi=bf.RuntimeABI(tvm=tvm, library_format=kind.library.name), loads_with=kind.loads_with,
    )


def tool_files(device: DeviceSpec) -> list[Path]:
    """The resolved executables of ``device``'s tools (a run's journal watches them: an upgraded
    tool changes the key's facts)."""
    from mlcbuild.toolchain import tool_path

    return [path for tool in device.spec.tools if (path := tool_path(tool.command, tool.min_version)) is not None]


def run_here(kind: str) -> str:
    """Whether this machine runs bundles of device kind ``kind``, in words (what ``doctor`` prints)."""
    import platform

    from mlcbuild.toolchain import tool_command

    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    spec = DEVICE_KINDS[kind]
    if spec.library.name != "elf-shared":
        return f"no: {spec.loads_with}"
    if spec.gpu is None:
        cpu = spec.host.split("-")[0]
        if cpu == machine:
            return "yes (mlcbuild chat/serve, MLCEngine)"
        if cpu == "aarch64" and tool_command("qemu-aarch64"):
            return "under qemu-aarch64 only (with an aarch64 Python and TVM: tests/aarch64_python.py)"
        return f"no: this machine is {machine}; {spec.loads_with}"
    if spec.gpu == "cuda":
        archs = cuda_gpus()
        return f"yes: {', '.join(archs)}" if archs else "no: no NVIDIA GPU here (nvidia-smi finds none)"
    return f"no: the mlcbuild runtime drives CPUs and CUDA GPUs; {spec.loads_with}"


def cuda_gpus() -> list[str]:
    """sm_XY of each NVIDIA GPU nvidia-smi lists (empty without a driver)."""
    import subprocess

    from mlcbuild.toolchain import tool_command

    smi = tool_command("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["sm_" + line.strip().replace(".", "") for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []
