"""Open a bundle: find it (a bundle directory, a directory of bundles, or a recipe naming them), verify it
against its manifest, pick it for a device, and load its library, weights, tokenizer and chat config.

The runtime reads only what :mod:`mlcbuild.bundle_format` specifies; it never imports the build side.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import xxhash

from mlcbuild import bundle_format as bf
from mlcbuild.atomicfile import write_atomic


class BundleError(Exception):
    """A bundle cannot be used (missing, corrupt, or not built for the requested device)."""


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeDevice:
    """Where to run: ``kind`` cpu or cuda, and the device index."""

    kind: str
    index: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "cpu" else f"{self.kind}:{self.index}"

    def tvm_device(self) -> Any:
        import tvm

        return tvm.cpu(self.index) if self.kind == "cpu" else tvm.cuda(self.index)


def _cuda_arch(index: int) -> str | None:
    """``sm_XY`` of CUDA device ``index``, or None when there is no such device."""
    import tvm

    dev = tvm.cuda(index)
    if not dev.exist:
        return None
    return "sm_" + str(dev.compute_version).replace(".", "")


def parse_runtime_device(text: str) -> tuple[str, int | None]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> (kind, index or None)."""
    text = text.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise BundleError(f"unknown device {text!r}; expected auto, cpu, cuda or cuda:N")


def _cpu_ok(bundle_device: str) -> bool:
    """A library for this machine's CPU kind (``cpu`` on x86-64, ``aarch64`` on Arm)."""
    import platform

    return bf.cpu_runs(bundle_device, platform.machine())


def _cuda_ok(bundle_device: str, arch: str) -> bool:
    """A CUDA library with SASS for ``arch`` (same major, equal or older minor) or PTX it can JIT."""
    return bf.cuda_device_runs(bundle_device, arch)


def choose(candidates: dict[str, Path], device: str) -> tuple[Path, RuntimeDevice]:
    """Pick the bundle (from bundle device name -> directory) that runs on ``device``."""
    kind, index = parse_runtime_device(device)
    available = ", ".join(sorted(candidates)) or "none"
    cuda_bundles = [name for name in candidates if name.startswith("cuda")]
    if kind == "cuda" and not cuda_bundles:
        raise BundleError(f"no library for {device}; the bundle has libraries for: {available}")
    if kind in ("cuda", "auto") and cuda_bundles:
        arch = _cuda_arch(index or 0)
        if arch is not None:
            for name in sorted(cuda_bundles, key=lambda n: n != f"cuda:{arch}"):
                if _cuda_ok(name, arch):
                    return candidates[name], RuntimeDevice("cuda", index or 0)
        if kind == "cuda":
            where = f"cuda:{index or 0}"
            if arch is None:
                raise BundleError(f"no CUDA device {where} on this machine (the bundle has libraries for: {available})")
            raise BundleError(f"no library for {where} ({arch}); the bundle has libraries for: {available}")
    for name in sorted(candidates, key=lambda n: ":" in n):
        if _cpu_ok(name):
            return candidates[name], RuntimeDevice("cpu", 0)
    if len(candidates) == 1:  # say why the one bundle there is does not run here
        raise BundleError(_why_not_here(next(iter(candidates))))
    raise BundleError(f"no library for {device}; the bundle has libraries for: {available}")


def _why_not_here(bundle_device: str) -> str:
    """What a bundle for ``bundle_device`` (which ``choose`` could not pick) needs, in words."""
    import platform

    kind = bundle_device.split(":")[0]
    apis = {"rocm": "ROCm", "metal": "Metal", "ios": "Metal (iOS)", "webgpu": "WebGPU", "vulkan": "Vulkan",
            "android": "OpenCL (Android)"}
    if kind in apis:
        return f"this bundle is for {bundle_device}; this machine has no {apis[kind]} device this runtime drives"
    if kind == "cuda":
        return f"this bundle is for {bundle_device}; this machine has no CUDA GPU it runs on"
    return f"this bundle is for {bundle_device}; this machine is {platform.machine()}"


# ----------------------------------------------------------------------------------------------
# Finding bundles
# ----------------------------------------------------------------------------------------------


def _read_manifest(directory: Path) -> bf.Manifest:
    try:
        return bf.read_manifest(directory)
    except FileNotFoundError:
        raise BundleError(f"{directory} is not a bundle: it has no {bf.MANIFEST_FILE}") from None
    except ValueError as exc:
        raise BundleError(f"{directory / bf.MANIFEST_FILE} is not a valid manifest: {exc}") from None


def _bundles_under(directory: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for child in sorted(directory.iterdir()):
        if (child / bf.MANIFEST_FILE).is_file():
            found.setdefault(_read_manifest(child).device, child)
    return found


def _read_recipe(recipe_path: Path) -> tuple[dict, list[str], list[str]]:
    """The recipe's fields, quantizations and devices, read as plain YAML (the recipe schema is the
    build side's; a malformed recipe fails there, with its line)."""
    import yaml

    try:
        recipe = yaml.safe_load(recipe_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BundleError(f"cannot read recipe {recipe_path}: {exc}") from None
    if not isinstance(recipe, dict) or not recipe.get("name"):
        raise BundleError(f"{recipe_path} is not a recipe (it has no 'name')")
    quants = recipe.get("quantization") or []
    quants = [quants] if isinstance(quants, str) else list(quants)
    devices = recipe.get("devices") or ["cpu"]
    devices = [devices] if isinstance(devices, str) else [str(d) for d in devices]
    return recipe, quants, devices


def recipe_fields(recipe_path: Path) -> dict:
    """A recipe's fields as plain YAML (e.g. its ``speculative:`` section for the front ends)."""
    return _read_recipe(recipe_path)[0]


def recipe_target(quantizations: list[str], devices: list[str], device: str = "auto",
                  quantization: str | None = None) -> tuple[str, str]:
    """(quantization, recipe device) of the one bundle of a recipe that a front end opened with
    ``device`` and ``quantization`` uses: the given quantization or the recipe's first, and the
    device :func:`choose` picks among the recipe's. What a build-first step builds."""
    if quantization is None:
        if not quantizations:
            raise BundleError("the recipe lists no quantization")
        quantization = quantizations[0]
    elif quantization not in quantizations:
        raise BundleError(f"the recipe has no quantization {quantization!r} (it has {quantizations})")
    chosen, _ = choose({d: Path(d) for d in devices}, device)
    return quantization, str(chosen)


# A build-first step: (recipe path, quantization, recipe device) -> None once that bundle is built
# and up to date, or BundleError. The runtime never imports the build side: the default runs the
# CLI in a subprocess; ``mlcbuild chat/serve`` build in process before opening (and pass build=False).
BuildHook = Callable[[Path, str, str], None]


def build_with_cli(recipe: Path, quantization: str, device: str) -> None:
    """``python -m mlcbuild run RECIPE -q Q --device D --quiet``: builds what is missing or stale (its
    progress on this process's stderr), a no-op when the bundle is up to date."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "mlcbuild", "run", str(recipe), "--quantization", quantization,
           "--device", device, "--quiet"]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BundleError(f"building {recipe} ({quantization}, {device}) failed (exit {done.returncode}); "
                          "see the output above")


def _recipe_bundles(recipe_path: Path, quantization: str | None, tensor_parallel_shards: int = 1) -> dict[str, Path]:
    """The bundles a recipe names: ``<output>/<quantization>-<device with ':' as '-'>[-tp<N>]``."""
    recipe, quants, devices = _read_recipe(recipe_path)
    output = Path(recipe.get("output") or f"dist/{recipe['name']}")
    if not output.is_absolute():
        output = recipe_path.parent / output
    if quantization is not None:
        if quantization not in quants:
            raise BundleError(f"recipe {recipe_path} has no quantization {quantization!r} (it has {quants})")
        quants = [quantization]
    found: dict[str, Path] = {}
    for quant in quants:
        for device in devices:
            candidate = output / bf.bundle_dirname(quant, str(device), tensor_parallel_shards)
            if (candidate / bf.MANIFEST_FILE).is_file():
                found.setdefault(str(device), candidate)
    if not found:
        shards = f" for tensor_parallel_shards={tensor_parallel_shards} (list it in the recipe's overrides)" \
            if tensor_parallel_shards > 1 else ""
        raise BundleError(
            f"recipe {recipe_path} names no built bundle{shards} under {output}; build it first (mlcbuild run {recipe_path})"
        )
    return found


def find_bundle(bundle_or_recipe: str | os.PathLike, device: str = "auto", quantization: str | None = None,
                build: bool | BuildHook = False, tensor_parallel_shards: int | None = None) -> tuple[Path, RuntimeDevice]:
    """Resolve a bundle directory, a directory of bundles or a recipe file to one bundle for ``device``.

    ``build``: given a recipe, first build the bundle it resolves to when missing or stale, as ``bazel
    run`` does (True: with :func:`build_with_cli`; or a :data:`BuildHook`); False: use what is built."""
    path = Path(bundle_or_recipe).expanduser()
    if not path.exists():
        raise BundleError(f"{path} does not exist (expected a bundle directory or a recipe file)")
    if path.is_file():
        if build:
            _, quants, devices = _read_recipe(path)
            target_quant, target_device = recipe_target(quants, devices, device, quantization)
            (build_with_cli if build is True else build)(path, target_quant, target_device)
        candidates = _recipe_bundles(path, quantization, tensor_parallel_shards or 1)
    elif (path / bf.MANIFEST_FILE).is_file():
        candidates = {_read_manifest(path).device: path}
    else:
        candidates = _bundles_under(path)
        if not candidates:
            raise BundleError(f"{path} is not a bundle: it has no {bf.MANIFEST_FILE}")
    return choose(candidates, device)


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def _stamp_path(directory: Path) -> Path:
    root = os.environ.get("MLCBUILD_VERIFY_CACHE")
    if root is None:
        import platformdirs

        root = os.path.join(platformdirs.user_cache_dir("mlcbuild"), "verified-bundles")
    return Path(root) / (xxhash.xxh3_64_hexdigest(str(directory.resolve()).encode()) + ".json")


def _tree_stats(directory: Path) -> dict[str, list[int]]:
    """(size, mtime, inode) of every file in the bundle: if none changed, neither did the content."""
    stats = {}
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            path = Path(dirpath) / name
            st = path.stat()
            stats[path.relative_to(directory).as_posix()] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def verify_bundle(directory: Path, manifest: bf.Manifest, use_stamp: bool = True) -> None:
    """Check the bundle against its manifest (every file's size and xxh3-128 digest; nothing extra).

    When it verified before and no file's (size, mtime, inode) changed since, the digests are not
    recomputed: the stamp saying so lives in the user cache, never in the bundle.
    """
    stamp = _stamp_path(directory)
    stats = _tree_stats(directory)
    if use_stamp:
        try:
            if json.loads(stamp.read_text()) == stats:
                return
        except (OSError, ValueError):
            pass
    problems = bf.verify_bundle(directory, manifest)
    if problems:
        raise BundleError(
            f"bundle {directory} does not verify against its {bf.MANIFEST_FILE}:\n  " + "\n  ".join(problems)
            + "\nRebuild it (mlcbuild run RECIPE) or pass verify=False / --no-verify at your own risk."
        )
    try:
        write_atomic(stamp, json.dumps(stats))
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _numpy_dtype(dtype: str) -> np.dtype:
    # bfloat16 is stored as raw uint16 bits; tvm takes the bits with the bfloat16 dtype via ml_dtypes.
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def read_tensor_cache(directory: Path) -> dict[str, np.ndarray]:
    """All weights of ``params/tensor-cache.json`` as numpy arrays over memory-mapped shards."""
    index_path = directory / bf.TENSOR_CACHE_FILE
    try:
        index = bf.TensorCacheIndex.model_validate_json(index_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {index_path}: {exc}") from None
    shards = {name: np.memmap(index_path.parent / name, dtype=np.uint8, mode="r") for name in index.shards}
    arrays: dict[str, np.ndarray] = {}
    for rec in index.tensors:
        if rec.format != "raw":
            raise BundleError(f"{index_path}: tensor {rec.name} has unsupported format {rec.format!r}")
        raw = shards[rec.shard][rec.offset : rec.offset + rec.nbytes]
        arrays[rec.name] = raw.view(_numpy_dtype(rec.dtype)).reshape(rec.shape)
    return arrays


_FATBINS: dict[str, bytes] = {}  # SHA-256 of CUDA source -> the fatbin nvcc built from it


def _use_prebuilt_cuda_kernels(bundle: Path) -> None:
    """Make TVM take the bundle's prebuilt fatbin when the CUDA library asks to compile its
    source at load time (see bundle_format.CUDA_KERNELS_FILE); sources we have no fatbin for
    fall back to TVM's own compiler hook."""
    import tvm_ffi

    info_path = bundle / bf.CUDA_KERNELS_FILE
    try:
        info = bf.CudaKernels.model_validate_json(info_path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"CUDA bundle {bundle} has no {bf.CUDA_KERNELS_FILE}; rebuild it with mlcbuild") from None
    _FATBINS[info.source_sha256] = (info_path.parent / info.fatbin).read_bytes()
    if getattr(_use_prebuilt_cuda_kernels, "registered", False):
        return
    fallback = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_cuda(code: str) -> bytearray:
        fatbin = _FATBINS.get(hashlib.sha256(code.encode()).hexdigest())
        if fatbin is not None:
            return bytearray(fatbin)
        if fallback is None:
            raise BundleError("a CUDA library asked to compile kernels it has no prebuilt fatbin for")
        return fallback(code)

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_cuda, override=True)
    _use_prebuilt_cuda_kernels.registered = True  # type: ignore[attr-defined]


def _check_runs_here(manifest: bf.Manifest, device: RuntimeDevice) -> None:
    """Refuse, up front, a bundle whose library this runtime cannot load here (another CPU, a GPU
    API it does not drive, a GPU arch the library has no code for, another TVM runtime ABI)
    instead of failing deep inside TVM's loader (bundle_format.cannot_run)."""
    import platform
    from importlib.metadata import version

    gpus = [arch] if device.kind == "cuda" and (arch := _cuda_arch(device.index)) else []
    problem = bf.cannot_run(manifest.device, manifest.library, platform.machine(), version("apache-tvm"), gpus)
    if problem:
        raise BundleError(problem)


@dataclass
class Bundle:
    """An opened, verified bundle, ready to load onto a device."""

    path: Path
    device: RuntimeDevice
    manifest: bf.Manifest
    chat_config: bf.ChatConfig

    @property
    def name(self) -> str:
        return self.manifest.name

    @classmethod
    def open(cls, bundle_or_recipe: str | os.PathLike, device: str = "auto", verify: bool = True,
             quantization: str | None = None, build: bool | BuildHook = False,
             tensor_parallel_shards: int | None = None) -> Bundle:
        """``tensor_parallel_shards``: the shard count wanted (a recipe's bundle for it; a bundle built for
        another count is refused); None: a recipe's single-shard bundle, or a bundle as built."""
        path, runtime_device = find_bundle(bundle_or_recipe, device, quantization, build, tensor_parallel_shards)
        manifest = _read_manifest(path)
        _check_runs_here(manifest, runtime_device)
        if verify:
            verify_bundle(path, manifest)
        try:
            chat_config = bf.ChatConfig.model_validate_json((path / bf.CHAT_CONFIG_FILE).read_bytes())
        except (OSError, ValueError) as exc:
            raise BundleError(f"cannot read {path / bf.CHAT_CONFIG_FILE}: {exc}") from None
        if tensor_parallel_shards is not None and chat_config.tensor_parallel_shards != tensor_parallel_shards:
            # the shard count is compiled in (each shard's library and weights): no other count can load it
            raise BundleError(f"{path} was built for tensor_parallel_shards={chat_config.tensor_parallel_shards}, not "
                              f"{tensor_parallel_shards}; build one with overrides: {{tensor_parallel_shards: "
                              f"{tensor_parallel_shards}}} in its recipe")
        return cls(path, runtime_device, manifest, chat_config)

    def load_library(self) -> Any:
        """The compiled module (load it once; tvm caches nothing)."""
        import tvm

        name = self.manifest.library.file if self.manifest.library else bf.LIBRARY_FILE
        lib = self.path / name
        if not lib.is_file():
            raise BundleError(f"bundle {self.path} has no {name}")
        if self.device.kind == "cuda":
            _use_prebuilt_cuda_kernels(self.path)
        return tvm.runtime.load_module(str(lib))

    def load_params(self, param_names: list[str]) -> list[Any]:
        """The weights in the order the library's ``_metadata()["params"]`` lists them, on the device."""
        import tvm

        arrays = read_tensor_cache(self.path)
        missing = [n for n in param_names if n not in arrays]
        if missing:
            raise BundleError(f"bundle {self.path}: weights missing from {bf.TENSOR_CACHE_FILE}: {missing[:5]}")
        dev = self.device.tvm_device()
        return [tvm.runtime.tensor(np.ascontiguousarray(arrays[n]), dev) for n in param_names]
