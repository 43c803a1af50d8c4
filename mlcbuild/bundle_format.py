"""What a bundle holds: the one contract between the stages that write a bundle and the runtime
that reads it. Only pydantic schemas and constants live here (no compiler, no tvm import).

Bundle layout (one directory per (quantization, device)):

    mlc-chat-config.json        ChatConfig
    tokenizer.json, tokenizer_config.json, ... (copied from the source)
    params/tensor-cache.json    TensorCacheIndex
    params/params_shard_<N>.bin raw little-endian tensor bytes
    lib/model.so                the compiled model library for the bundle's device
    manifest.json               Manifest (recipe, node keys, every file's size, xxh3 and sha256, tools)

Functions the compiled library exports (driven through tvm's relax VM; ``params`` is the list
of weight tensors in the order of ``_metadata()["params"]``; ``kv_cache`` is the object that
``create_paged_kv_cache`` returns, driven with tvm's ``vm.builtin.kv_state_*`` functions):

    _metadata() -> str (JSON: model_type, quantization, params [{name, shape, dtype}], limits)
    embed(input_ids: int32[n], params) -> [n, hidden]
    prefill(embeddings: [1, n, hidden], kv_cache, params) -> logits [1, 1, vocab] (last token)
    batch_prefill(embeddings: [1, n, hidden], logit_positions: int32[b], kv_cache, params)
        -> logits [1, b, vocab]
    decode(embeddings: [1, 1, hidden], kv_cache, params) -> logits [1, 1, vocab]
    batch_decode(embeddings: [b, 1, hidden], kv_cache, params) -> logits [b, 1, vocab]
    create_paged_kv_cache(max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                          support_sliding_window) -> kv_cache
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

CHAT_CONFIG_FILE = "mlc-chat-config.json"
TENSOR_CACHE_FILE = "params/tensor-cache.json"
LIBRARY_FILE = "lib/model.so"
MANIFEST_FILE = "manifest.json"
# Tokens per KV-cache page: the compile stage records it in the library's ``_metadata()`` and the
# chat config; the runtime passes the bundle's value to ``create_paged_kv_cache``.
PAGE_SIZE = 16
# CUDA bundles: TVM 0.27 keeps CUDA *source* in model.so and compiles it when the library loads
# (its ``tvm_callback_cuda_compile`` hook). The compile stage builds the kernels with nvcc ahead of
# time instead; this file (a CudaKernels) names the fatbin and the SHA-256 of the source it was
# built from, so a runtime can hand the fatbin to that hook and load without nvcc or NVRTC.
CUDA_KERNELS_FILE = "lib/cuda-kernels.json"
# Written by compile, read by package (not bundled: its content goes into the manifest): the
# kernel schedules that fell back (a JSON list of ScheduleFallback).
SCHEDULE_REPORT_FILE = "lib/schedule-report.json"

# Named conversation templates a recipe may ask for; "auto" uses the tokenizer's chat template.
KNOWN_CONV_TEMPLATES = ("auto", "llama-3", "llama-2", "phi-2", "chatml", "mistral")


class CudaKernels(BaseModel):
    """lib/cuda-kernels.json: the prebuilt fatbin of a CUDA library (path relative to lib/)."""

    model_config = ConfigDict(frozen=True)

    arch: str
    fatbin: str
    source_sha256: str


class ManifestFile(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    digest: str  # xxh3-128 hex of the file's bytes (the fast local check)
    size: int
    # sha256 hex of the file's bytes: what a bundle that crossed machines is checked with. None
    # only in manifests written before it was recorded (verify reports those: rebuild them).
    sha256: str | None = None


class RecipeFile(BaseModel):
    """A file the build read that the bundle does not hold (the recipe, its lock): a
    provenance material. By name, not path, so two checkouts of one recipe give one manifest."""

    model_config = ConfigDict(frozen=True)

    name: str
    sha256: str


class ScheduleFallback(BaseModel):
    """A kernel schedule that applied to a function and failed, so that function got a slower
    kernel (a less specific rule's, TVM's default, or none). The compile stage lists them in
    ``SCHEDULE_REPORT_FILE`` and its node record, the package stage in the manifest."""

    model_config = ConfigDict(frozen=True)

    function: str  # the PrimFunc (kernel) name
    rule: str  # the schedule rule that failed
    error: str  # the exception, one line

    @classmethod
    def from_error(cls, function: str, rule: str, error: BaseException) -> "ScheduleFallback":
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return cls(function=function, rule=rule, error=f"{type(error).__name__}: {lines[-1] if lines else ''}"[:300])

    def describe(self) -> str:
        return f"{self.function}: the {self.rule} schedule failed, fell back ({self.error})"


# --- The library: what file it is, what it needs to load, and where it can run ------------------


class LibraryFormat(BaseModel):
    """A kind of compiled library file (``mlcbuild.devices`` says which device kind builds which)."""

    model_config = ConfigDict(frozen=True)

    name: str
    file: str  # its path inside a bundle
    description: str


LIBRARY_FORMATS: dict[str, LibraryFormat] = {f.name: f for f in (
    LibraryFormat(name="elf-shared", file=LIBRARY_FILE,
                  description="an ELF shared library: host code, with the GPU code objects (CUDA, ROCm, SPIR-V) inside; "
                              "TVM's runtime dlopens it"),
    LibraryFormat(name="macho-dylib", file="lib/model.dylib",
                  description="a Mach-O dynamic library for arm64 macOS: host code, with the Metal shader source inside "
                              "(the Metal framework compiles it when the library loads)"),
    LibraryFormat(name="static-tar", file="lib/model.tar",
                  description="a tar of object files (host code, and devc.o holding the GPU kernels) to link into an "
                              "app with TVM's runtime as a system library"),
    LibraryFormat(name="wasm", file="lib/model.wasm",
                  description="a WebAssembly module with the WGSL shaders inside, linked against TVM's web runtime "
                              "(tvmjs), as WebLLM loads it"),
)}
GPU_API_NAMES = {"cuda": "CUDA", "rocm": "ROCm", "metal": "Metal", "webgpu": "WebGPU", "vulkan": "Vulkan",
                 "opencl": "OpenCL"}
# The GPU APIs the mlcbuild runtime drives (other bundles are for other runtimes: see LibraryInfo.loads_with).
RUNTIME_GPU_APIS = ("cuda",)
# A `cuda` bundle (no arch) carries SASS for these and PTX of the last: it runs on every GPU since
# Turing (MLC LLM issues #1020, #994: CUDA_ERROR_NO_BINARY_FOR_GPU).
CUDA_MULTI_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")
# The device kind whose libraries a CPU architecture runs (platform.machine() -> kind).
CPU_DEVICE_KINDS = {"x86_64": "cpu", "amd64": "cpu", "aarch64": "aarch64", "arm64": "aarch64"}


class RuntimeABI(BaseModel):
    """What a runtime must be to load the library (MLC LLM issues #3180, #507: libraries stop loading
    after a TVM upgrade, failing deep in the VM loader). TVM's runtime ABI changes between minor
    releases, so a runtime whose TVM ``major.minor`` differs refuses the library up front."""

    model_config = ConfigDict(frozen=True)

    tvm: str  # the apache-tvm version that built the library, e.g. "0.27.0.post1"
    library_format: str  # a LIBRARY_FORMATS key


class LibraryInfo(BaseModel):
    """manifest.json ``library``: what the bundle's library is for and what loads it."""

    model_config = ConfigDict(frozen=True)

    file: str  # path inside the bundle
    format: str  # a LIBRARY_FORMATS key
    host: str  # the CPU side: "x86_64-linux", "aarch64-linux", "arm64-macos", "arm64-ios", "aarch64-android", "wasm32"
    gpu: str | None = None  # the GPU API of its kernels ("cuda", "rocm", "metal", "webgpu", "vulkan", "opencl")
    gpu_archs: list[str] = []  # GPU archs with native code (cuda: sm_XY, rocm: gfx...)
    ptx: str | None = None  # cuda: the PTX it carries for newer GPUs ("compute_90")
    runtime_abi: RuntimeABI
    loads_with: str  # what loads it, for a human


def device_dirname(device: str) -> str:
    """A device name as a file-name component (no colon): ``cuda:sm_90`` -> ``cuda-sm_90``."""
    return device.replace(":", "-")


def bundle_dirname(quantization: str, device: str, tensor_parallel_shards: int = 1) -> str:
    """The directory of one (quantization, device) bundle inside a recipe's output directory; a
    sharded bundle's ends in ``-tp<N>``."""
    suffix = f"-tp{tensor_parallel_shards}" if tensor_parallel_shards > 1 else ""
    return f"{quantization}-{device_dirname(device)}{suffix}"


def tvm_abi(version: str) -> str:
    """The part of a TVM version its runtime ABI follows: ``major.minor``."""
    return ".".join(version.split(".")[:2])


def cuda_arch_runs(built: str, gpu: str) -> bool:
    """A library with SASS for ``built`` (sm_XY) runs on a GPU of arch ``gpu`` when the major
    version is the same and the GPU's minor is at least as high (CUDA's binary compatibility).
    Arch-specific (sm_90a) code runs only on that very arch."""
    def split(arch: str) -> tuple[int, int, str]:
        digits = arch.removeprefix("sm_").removeprefix("compute_")
        suffix = digits[-1] if digits[-1:].isalpha() else ""
        number = digits[: len(digits) - len(suffix)]
        return int(number[:-1]), int(number[-1]), suffix

    (bmaj, bmin, bsuf), (gmaj, gmin, _) = split(built), split(gpu)
    if bsuf:
        return (bmaj, bmin) == (gmaj, gmin)
    return bmaj == gmaj and bmin <= gmin


def cuda_library_runs(library: LibraryInfo, gpu: str) -> bool:
    """Whether a CUDA library runs on a GPU of arch ``gpu``: native code for it, or PTX of an older
    or equal arch (the driver compiles PTX for newer GPUs)."""
    if any(cuda_arch_runs(arch, gpu) for arch in library.gpu_archs):
        return True
    if library.ptx:
        def number(arch: str) -> int:
            return int("".join(c for c in arch.split("_")[-1] if c.isdigit()))

        return number(library.ptx) <= number(gpu)
    return False


def cpu_runs(device: str, machine: str) -> bool:
    """Whether a bundle built for ``device`` (a name) is the CPU kind of this ``machine``."""
    return device.split(":")[0] == CPU_DEVICE_KINDS.get(machine.lower())


def cuda_device_runs(device: str, gpu: str) -> bool:
    """Whether a bundle built for CUDA device name ``device`` (``cuda`` or ``cuda:sm_XY``) runs on a
    GPU of arch ``gpu``, from the name alone (SASS for the arch, PTX of the same arch)."""
    if device == "cuda":
        archs, ptx = list(CUDA_MULTI_ARCHS), "compute_" + CUDA_MULTI_ARCHS[-1][3:]
    elif device.startswith("cuda:sm_"):
        archs, ptx = [device[5:]], "compute_" + device[8:].rstrip("af")
        if device[-1:].isalpha():  # sm_90a: arch-specific features, no PTX for other GPUs
            ptx = None
    else:
        return False
    probe = LibraryInfo(file="", format="elf-shared", host="x86_64-linux", gpu="cuda", gpu_archs=archs, ptx=ptx,
                        runtime_abi=RuntimeABI(tvm="", library_format="elf-shared"), loads_with="")
    return cuda_library_runs(probe, gpu)


def cannot_run(device: str, library: LibraryInfo | None, machine: str, tvm: str, cuda_archs: list[str]) -> str | None:
    """Why the library of a bundle built for ``device`` cannot run here (None: it can). ``machine``:
    this CPU (``platform.machine()``), ``tvm``: this runtime's apache-tvm version, ``cuda_archs``:
    the sm_XY of each CUDA GPU present. The one device-compatibility check of the runtime."""
    if library is None:
        return (f"this bundle ({device}) was built by an older mlcbuild that did not record its library's "
                "runtime ABI; rebuild it (mlcbuild run RECIPE)")
    if library.runtime_abi.library_format != "elf-shared":
        fmt = LIBRARY_FORMATS.get(library.runtime_abi.library_format)
        what = fmt.description if fmt else library.runtime_abi.library_format
        return f"this bundle is for {device}: its library is {what}; load it with {library.loads_with}"
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine.lower())
    host_arch = library.host.split("-")[0]
    if library.host.endswith("-linux") and host_arch != arch:
        return (f"this bundle is for {device} ({host_arch} Linux); this machine is {arch}: "
                f"load it on {library.loads_with}")
    if library.gpu is not None and library.gpu not in RUNTIME_GPU_APIS:
        api = GPU_API_NAMES.get(library.gpu, library.gpu)
        return f"this bundle is for {device}; this machine has no {api} device this runtime drives " \
               f"(load it with {library.loads_with})"
    if library.gpu == "cuda":
        if not cuda_archs:
            return f"this bundle is for {device}; this machine has no CUDA GPU"
        if not any(cuda_library_runs(library, gpu) for gpu in cuda_archs):
            return (f"this bundle is for {device} (code for {', '.join(library.gpu_archs)}"
                    f"{', PTX ' + library.ptx if library.ptx else ''}); the GPU here is {', '.join(cuda_archs)}: "
                    f"build for cuda:{cuda_archs[0]} or cuda (every arch)")
    if tvm_abi(library.runtime_abi.tvm) != tvm_abi(tvm):
        return (f"this bundle's library was built with TVM {library.runtime_abi.tvm} (runtime ABI {tvm_abi(library.runtime_abi.tvm)}); "
                f"this runtime has TVM {tvm} (ABI {tvm_abi(tvm)}): rebuild the bundle with this TVM "
                f"(mlcbuild run RECIPE), or install apache-tvm=={library.runtime_abi.tvm} to run it")
    return None


class Manifest(BaseModel):
    """manifest.json: how a bundle was made and what it must contain."""

    model_config = ConfigDict(frozen=True)

    format_version: int = 1
    name: str
    quantization: str
    device: str
    recipe: dict  # the recipe fields that shaped this bundle
    node_keys: dict[str, str]  # node label -> key, for every node that built the bundle
    tools: dict[str, str]  # tvm, python, nvcc, mlcbuild versions; target
    source: dict = {}  # where the weights came from (e.g. {"format": "gguf", "quantized": "Q4_1"})
    recipe_files: list[RecipeFile] = []  # the recipe file and its lock file, with their sha256
    schedule_fallbacks: list[ScheduleFallback] = []  # kernels that fell back to a slower schedule
    # What the library is for, what loads it, the runtime ABI it needs (None: an older mlcbuild).
    library: LibraryInfo | None = None
    files: list[ManifestFile]


# --- Written by gen_config / convert_weight (compiler stages); read by the runtime. ---------------
# Field names are a contract: add fields with defaults, never rename or remove.


class ChatConfig(BaseModel):
    """mlc-chat-config.json: everything the runtime needs besides weights and the library.

    The JSON key ``model_config`` (attribute ``arch_config``: pydantic reserves the name) is the
    architecture's normalized config; the compile stage rebuilds the model from it, so it holds
    every field that shapes the compiled graph. The limits below are the values the library was
    compiled for. Write with ``model_dump_json(by_alias=True)``.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, protected_namespaces=())

    format_version: int = 1
    model_type: str  # key of mlcbuild.models.ARCHITECTURES, e.g. "llama", "qwen2", "phi"
    arch_config: dict = Field(alias="model_config")  # normalized config, mlcbuild/models/<arch>.py
    quantization: str  # key of mlcbuild.quantization.QUANTIZATIONS
    model_dtype: str  # dtype of activations / KV cache: float32, float16 or bfloat16
    vocab_size: int
    context_window_size: int  # max tokens in one sequence (prompt + generated)
    prefill_chunk_size: int  # max tokens per prefill call
    # -1: no sliding window. Otherwise each token attends to the last sliding_window_size
    # tokens (itself included, as in HF): create the KV cache with support_sliding_window=1 and
    # call attention_kv_cache_enable_sliding_window_for_seq(kv, seq, sliding_window_size - 1,
    # attention_sink_size) after adding a sequence (the cache keeps that many *previous* tokens).
    sliding_window_size: int = -1
    attention_sink_size: int = 0  # tokens kept at the start when a sliding window is active
    tensor_parallel_shards: int = 1
    max_batch_size: int = 1  # sequences decoded together by batch_decode
    page_size: int = PAGE_SIZE  # KV cache page size the runtime should pass to create_paged_kv_cache
    conv_template: str  # "auto" (use chat_template) or a name in KNOWN_CONV_TEMPLATES
    chat_template: str | None = None  # jinja template from the tokenizer (used when "auto")
    # generation defaults (from generation_config.json where present)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: disabled
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int | None = None
    do_sample: bool = True
    bos_token_id: int | None = None
    eos_token_id: list[int] = []
    pad_token_id: int | None = None
    tokenizer_files: list[str] = []  # file names copied next to this config


class TensorRecord(BaseModel):
    """One tensor in the weight shards."""

    model_config = ConfigDict(frozen=True)

    name: str  # parameter name, as in the library's _metadata()["params"]
    shape: list[int]
    dtype: str  # numpy-style name: float32, float16, bfloat16 (raw uint16 bits), uint32, ...
    format: str = "raw"  # little-endian, C-contiguous bytes
    shard: str  # file name inside params/, e.g. "params_shard_0.bin"
    offset: int  # byte offset inside the shard
    nbytes: int
    digest: str  # xxh3-128 hex of the tensor's bytes
    # Sharded weights (tensor_parallel_shards > 1): the shard (disco worker) that loads this tensor;
    # None in a single-shard index (written without the field, so those indexes are unchanged).
    rank: int | None = None


class TensorCacheIndex(BaseModel):
    """params/tensor-cache.json: where each weight tensor lives. ``tensors`` is in the order of
    the library's ``_metadata()["params"]`` (the order the packed ``params`` argument takes)."""

    model_config = ConfigDict(frozen=True)

    format_version: int = 1
    quantization: str
    model_type: str
    shards: list[str]  # shard file names inside params/, in order
    tensors: list[TensorRecord]
    # >1: every tensor has a rank and each rank's tensors are in files of their own, so a worker reads
    # only its slice (None: one shard; written without the field).
    tensor_parallel_shards: int | None = None


SOURCE_INFO_FILE = "mlcbuild-source.json"  # written by the download stage: where weights came from


def read_manifest(bundle: Path | str) -> Manifest:

    path = Path(bundle) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; is {bundle} a bundle built by mlcbuild?") from None


def verify_bundle(bundle: Path | str, manifest: Manifest | None = None) -> list[str]:
    """Check every file of a bundle against its manifest: missing, extra, wrong size or digest
    (xxh3-128 and sha256, both from one read of each file). Returns the problems found, each
    starting with the file's path (empty when the bundle is intact)."""
    import hashlib
    import os

    import xxhash

    root = Path(bundle)
    manifest = manifest or read_manifest(root)
    problems = []
    listed = {f.path for f in manifest.files}
    for entry in manifest.files:
        path = root / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing")
            continue
        if size != entry.size:
            problems.append(f"{entry.path}: size {size}, manifest says {entry.size}")
            continue
        if entry.sha256 is None:
            problems.append(f"{entry.path}: the manifest records no sha256 (an older mlcbuild made it); rebuild the bundle")
            continue
        fast, strong = xxhash.xxh3_128(), hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(8 << 20):
                fast.update(chunk)
                strong.update(chunk)
        if fast.hexdigest() != entry.digest:
            problems.append(f"{entry.path}: content differs from the manifest's digest")
        elif strong.hexdigest() != entry.sha256:
            problems.append(f"{entry.path}: content differs from the manifest's digest "
                            f"(sha256 {strong.hexdigest()}, manifest says {entry.sha256})")
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST_FILE and rel not in listed:
                problems.append(f"{rel}: not in the manifest")
    return problems
