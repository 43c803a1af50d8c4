"""One recipe, one tiny model, every device MLC LLM deploys to that this machine can build: the bundles,
what is inside each, and running them where we can (the aarch64 one under qemu-user, the WebGPU
kernels through wgpu on a CPU Vulkan driver).

Needs the toolchains `.ci/run` installs (doctor lists them); without them the module is skipped, unless
MLCBUILD_REQUIRE_DEVICE_TOOLCHAINS=1 (CI sets it), which turns a missing tool into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from subprocess_env import clean_env
from mlcbuild import bundle_format as bf
from mlcbuild.devices import build_problems, parse_device

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEVICES = ["cpu", "aarch64", "cuda:sm_90", "rocm:gfx942", "metal", "webgpu"]
QUANT = "q4f32_1"
RECIPE = f"""\
name: tiny-devices
source: src
conv_template: auto
quantization: [{QUANT}]
devices: [{", ".join(DEVICES)}]
overrides:
  context_window_size: 128
  prefill_chunk_size: 16
  max_batch_size: 2
"""
REQUIRED = os.environ.get("MLCBUILD_REQUIRE_DEVICE_TOOLCHAINS") == "1"


def _need(condition: bool, why: str) -> None:
    if not condition:
        if REQUIRED:
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="module")
def device_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache for this module's builds: TVM's web runtime, built on the first webgpu
    compile (a minute), is kept there for the next."""
    return tmp_path_factory.mktemp("device-cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, device_cache: Path) -> dict:
    """`mlcbuild run` of the recipe: its JSON events and bundle directories."""
    problems = [p for d in DEVICES for p in build_problems(d)]
    _need(not problems, "toolchains missing (see mlcbuild doctor): " + "; ".join(problems))
    from compiler_harness import TINY, make_checkpoint
    from runtime_support import write_tokenizer

    root = tmp_path_factory.mktemp("devices")
    write_tokenizer(make_checkpoint("llama", root / "src"), TINY["vocab_size"])
    (root / "tiny.yaml").write_text(RECIPE)
    env = clean_env(MLCBUILD_CACHE_DIR=str(device_cache), MLCBUILD_VERIFY_CACHE=str(root / "verified"))
    done = subprocess.run([sys.executable, "-m", "mlcbuild", "run", str(root / "tiny.yaml"), "--json", "-j", "2"],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    bundles = {d: root / "dist" / "tiny-devices" / bf.bundle_dirname(QUANT, d) for d in DEVICES}
    return {"root": root, "events": events, "bundles": bundles, "env": env}


def _library(bundle: Path) -> tuple[bf.Manifest, bytes]:
    manifest = bf.read_manifest(bundle)
    assert manifest.library is not None
    return manifest, (bundle / manifest.library.file).read_bytes()


def test_every_bundle_builds_from_one_weight_conversion_and_verifies(built):
    started = [e for e in built["events"] if e["event"] == "node_start"]
    assert sum(1 for e in started if e["stage"] == "convert_weight") == 1  # weights shared by all 6 devices
    assert sum(1 for e in started if e["stage"] == "compile") == len(DEVICES)
    assert [e["node"] for e in started if e["stage"] == "web_runtime"] == ["web_runtime"]  # for the webgpu compile
    formats = {"cpu": ("elf-shared", "x86_64-linux", None), "aarch64": ("elf-shared", "aarch64-linux", None),
               "cuda:sm_90": ("elf-shared", "x86_64-linux", "cuda"), "rocm:gfx942": ("elf-shared", "x86_64-linux", "rocm"),
               "metal": ("macho-dylib", "arm64-macos", "metal"), "webgpu": ("wasm", "wasm32", "webgpu")}
    weights = set()
    for device, bundle in built["bundles"].items():
        done = subprocess.run([sys.executable, "-m", "mlcbuild", "verify", str(bundle)], capture_output=True,
                              text=True, env=built["env"])
        assert done.returncode == 0, done.stdout + done.stderr
        manifest, _ = _library(bundle)
        assert (manifest.device, manifest.library.format, manifest.library.host, manifest.library.gpu) == (device, *formats[device])
        assert manifest.library.runtime_abi.tvm == manifest.tools["tvm"]
        weights.add(next(f.sha256 for f in manifest.files if f.path.endswith(".bin")))
    assert len(weights) == 1
    assert bf.read_manifest(built["bundles"]["aarch64"]).tools["cc"].startswith("aarch64-linux-gnu-gcc")
    assert bf.read_manifest(built["bundles"]["webgpu"]).tools["emcc"].startswith("emcc")


# ---- aarch64: the bundle runs under qemu-user, greedy tokens equal to the x86 bundle's --------------


@pytest.fixture(scope="module")
def aarch64_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from aarch64_python import PYTHON, build

    _need(shutil.which("qemu-aarch64") is not None, "qemu-aarch64 is missing: apt-get install qemu-user")
    given = os.environ.get("MLCBUILD_AARCH64_SYSROOT")
    if given and (Path(given) / PYTHON).exists():
        return Path(given)
    try:
        return build(Path(given) if given else tmp_path_factory.mktemp("aarch64") / "sysroot")
    except subprocess.CalledProcessError as exc:
        _need(False, f"cannot make an aarch64 Python (dpkg --add-architecture arm64 && apt-get update?): {exc}")
        raise


def test_aarch64_bundle_runs_under_qemu_with_the_x86_greedy_tokens(built, aarch64_python):
    from aarch64_python import command, environment

    prompt, steps = "1,17,42,99,7,250,3", 6
    script = str(HERE / "greedy_tokens.py")
    env = {**built["env"], "MLCBUILD_VERIFY_CACHE": str(built["root"] / "verified-x86")}
    x86 = subprocess.run([sys.executable, script, str(built["bundles"]["cpu"]), prompt, str(steps)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert x86.returncode == 0, x86.stderr
    arm_env = {**environment(aarch64_python, REPO), "MLCBUILD_VERIFY_CACHE": str(built["root"] / "verified-arm")}
    arm = subprocess.run(command(aarch64_python, script, str(built["bundles"]["aarch64"]), prompt, str(steps)),
                         capture_output=True, text=True, env=arm_env, timeout=900)
    assert arm.returncode == 0, arm.stderr[-4000:]
    ours, theirs = json.loads(x86.stdout), json.loads(arm.stdout)
    assert (ours["device"], theirs["device"]) == ("cpu", "aarch64")
    assert theirs["tokens"] == ours["tokens"]
    np.testing.assert_allclose(np.array(theirs["logits"]), np.array(ours["logits"]), rtol=1e-3, atol=1e-3)
    # and the x86 runtime refuses the aarch64 bundle up front, saying where it runs
    from mlcbuild.runtime.bundle import Bundle, BundleError

    with pytest.raises(BundleError, match=r"this bundle is for aarch64; this machine is x86_64"):
        Bundle.open(built["bundles"]["aarch64"], device="cpu")


# ---- ROCm: AMDGPU code objects for gfx942, one kernel per device function of the CUDA build ----------


def _amdgpu_elfs(data: bytes) -> list[bytes]:
    """The AMDGPU ELF code objects (EM_AMDGPU = 224) embedded in a library."""
    found, at = [], data.find(b"\x7fELF")
    while at >= 0:
        if struct.unpack_from("<H", data, at + 18)[0] == 224:
            shoff = struct.unpack_from("<Q", data, at + 0x28)[0]
            shentsize, shnum = struct.unpack_from("<HH", data, at + 0x3A)
            found.append(data[at: at + shoff + shentsize * shnum])
        at = data.find(b"\x7fELF", at + 1)
    return found


def _llvm_tool(name: str) -> str:
    from mlcbuild.toolchain import tool_command

    tool = tool_command(name, min_version=17)
    _need(tool is not None, f"{name} of LLVM 17+ is missing (AMDGPU gfx942): apt-get install llvm-19")
    return tool


def test_rocm_code_object_is_gfx942_with_the_cuda_builds_kernels(built, tmp_path):
    _, library = _library(built["bundles"]["rocm:gfx942"])
    elfs = _amdgpu_elfs(library)
    assert len(elfs) == 1
    code = tmp_path / "kernels.hsaco"
    code.write_bytes(elfs[0])
    header = subprocess.run([_llvm_tool("llvm-readelf"), "--file-header", str(code)], capture_output=True, text=True, check=True).stdout
    assert "EM_AMDGPU" in header and "gfx942" in header and "AMDGPU - HSA" in header
    assert struct.unpack_from("<I", elfs[0], 0x30)[0] & 0xFF == 0x4C  # EF_AMDGPU_MACH_AMDGCN_GFX942
    symbols = subprocess.run([_llvm_tool("llvm-readelf"), "--symbols", "--wide", str(code)], capture_output=True, text=True,
                             check=True).stdout
    rocm_kernels = {line.split()[-1][: -len(".kd")] for line in symbols.splitlines() if line.split() and line.split()[-1].endswith(".kd")}
    # every kernel's launch limit is the 256 threads the rocm target's schedules keep to (see the next test)
    notes = subprocess.run([_llvm_tool("llvm-readelf"), "--notes", str(code)], capture_output=True, text=True, check=True).stdout
    assert re.findall(r"\.max_flat_workgroup_size:\s*(\d+)", notes) == ["256"] * len(rocm_kernels)
    disassembly = subprocess.run([_llvm_tool("llvm-objdump"), "-d", "--mcpu=gfx942", str(code)], capture_output=True, text=True)
    assert disassembly.returncode == 0 and "s_endpgm" in disassembly.stdout, disassembly.stderr[-2000:]
    _, cuda = _library(built["bundles"]["cuda:sm_90"])
    cuda_kernels = set(re.findall(rb"extern \"C\" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", cuda))
    assert cuda_kernels and rocm_kernels == {k.decode() for k in cuda_kernels}


def test_rocm_kernels_fit_the_work_group_size_their_code_object_declares(capfd):
    """Without an AMD GPU at build time TVM stamps every kernel's code object with a flat work-group
    size of at most 256 threads (and warns once per kernel): a kernel launched wider fails on the GPU.
    The rocm target keeps schedules to 256, the build refuses a wider kernel, and the warning is gone."""
    _need(not build_problems("rocm:gfx942"), "; ".join(build_problems("rocm:gfx942")))
    import tvm
    from tvm.s_tir import dlight as dl
    from tvm import te

    from mlcbuild.compiler.build import _device_callbacks
    from mlcbuild.devices import target_dict

    x = te.placeholder((8192,), "float32", name="x")
    y = te.compute((8192,), lambda i: x[i] * 2.0, name="y")
    device = parse_device("rocm:gfx942")

    def compile_with(target_json: dict) -> None:
        target = tvm.target.Target(target_json)
        with target, _device_callbacks(device):
            mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(tvm.IRModule({"double": te.create_prim_func([x, y])}))
            tvm.compile(mod, target=target)

    capfd.readouterr()
    compile_with(target_dict(device))  # the rocm target: 256 threads, fits
    printed = capfd.readouterr()
    assert "Cannot get maximum number of threads" not in printed.err + printed.out
    with pytest.raises(Exception, match=r"1 kernel\(s\) launch more than the 256 threads.*main_kernel \(1024 threads\)"):
        compile_with({**target_dict(device), "max_threads_per_block": 1024, "max_num_threads": 1024})


# ---- Metal: arm64 Mach-O host code; the shader source parses -------------------------------------------


METAL_SHIM = HERE / "metal_shim"


def test_metal_library_is_an_arm64_macos_dylib_whose_shaders_parse(built, tmp_path):
    manifest, library = _library(built["bundles"]["metal"])
    header = subprocess.run([_llvm_tool("llvm-objdump"), "--macho", "--private-header",
                             str(built["bundles"]["metal"] / manifest.library.file)], capture_output=True, text=True, check=True)
    assert re.search(r"MH_MAGIC_64\s+ARM64\s+ALL\s+\S+\s+DYLIB", header.stdout), header.stdout
    _assert_metal_shaders_parse(library, tmp_path)


def test_metal_library_rebuilds_byte_identical_with_a_consistent_signature(built):
    """ld64.lld's LC_UUID (and the ad-hoc signature over it) hashed the debug stabs, which name TVM's
    temporary object files: linked without them (-S), a rebuild gives the same bytes, signature intact."""
    import hashlib

    bundle = built["bundles"]["metal"]
    manifest, first = _library(bundle)
    recipe = built["root"] / "tiny.yaml"
    done = subprocess.run([sys.executable, "-m", "mlcbuild", "run", str(recipe), "--json", "--device", "metal",
                           "--force-stage", "compile"], capture_output=True, text=True, env=built["env"], timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert any(e.get("event") == "node_start" and e.get("stage") == "compile"
               for e in map(json.loads, filter(lambda line: line.startswith("{"), done.stdout.splitlines())))
    again = (bundle / manifest.library.file).read_bytes()
    assert again == first
    # Every code page's SHA-256 in the CodeDirectory matches the page (the UUID's page included).
    sig_at = next(struct.unpack_from("<I", again, at + 8)[0] for at in _macho_commands(again) if struct.unpack_from("<I", again, at)[0] == 0x1D)
    count = struct.unpack_from(">I", again, sig_at + 8)[0]
    directories = [sig_at + struct.unpack_from(">I", again, sig_at + 16 + 8 * i)[0] for i in range(count)]
    cd = next(d for d in directories if struct.unpack_from(">I", again, d)[0] == 0xFADE0C02)
    hash_offset, _, _, slots, limit = struct.unpack_from(">5I", again, cd + 16)
    page = 1 << again[cd + 39]
    for slot in range(slots):
        stored = again[cd + hash_offset + 32 * slot: cd + hash_offset + 32 * (slot + 1)]
        assert stored == hashlib.sha256(again[slot * page: min((slot + 1) * page, limit)]).digest(), slot


def _macho_commands(data: bytes) -> list[int]:
    """Offsets of a 64-bit Mach-O file's load commands."""
    offsets, at = [], 32
    for _ in range(struct.unpack_from("<I", data, 16)[0]):
        offsets.append(at)
        at += struct.unpack_from("<I", data, at + 4)[0]
    return offsets


def _assert_metal_shaders_parse(library: bytes, tmp_path: Path) -> None:
    sources = []
    for m in re.finditer(rb"#include <metal_stdlib>", library):  # one source per kernel, length-prefixed
        length = struct.unpack_from("<Q", library, m.start() - 8)[0]
        sources.append(library[m.start(): m.start() + length].decode())
    kernels = [name for source in sources for name in re.findall(r"kernel void (\w+)\(", source)]
    assert len(kernels) == len(sources) > 20
    # No Metal compiler runs on Linux: clang parses each source as the C++ it is, with a header
    # declaring Metal's types (vector types with swizzles) and built-ins (tests/metal_shim); an
    # undeclared name, a wrong argument count or a type error fails here.
    clang = shutil.which("clang-14") or shutil.which("clang")
    _need(clang is not None, "clang is missing (it comes with emscripten)")
    files = []
    for index, source in enumerate(sources):
        files.append(tmp_path / f"kernel{index}.metal")
        files[-1].write_text(_metal_vector_conversions(source))
    parsed = subprocess.run([clang, "--target=aarch64-linux-gnu", "-fsyntax-only", "-x", "c++", "-std=c++17",
                             "-I", str(METAL_SHIM), "-Wno-unknown-attributes", *map(str, files)],
                            capture_output=True, text=True)
    assert parsed.returncode == 0, parsed.stderr[-4000:]


_VECTOR_CAST = re.compile(r"\((?:float|half|int|uint|short|ushort|char|uchar|long)[234]\)")


def _metal_vector_conversions(source: str) -> str:
    """Metal's ``(float4)h`` converts a half4 element by element (or splats a scalar), and
    ``(int4)(a, b, c, d)`` is a vector literal, where a C-style cast between clang vectors of
    different sizes is a bit cast (an error): rewrite each vector cast as the shim's
    ``mlcbuild_convert`` and each vector literal as a brace initialisation."""
    out, pos = [], 0
    for m in _VECTOR_CAST.finditer(source):
        if m.start() < pos:
            continue
        end = _operand_end(source, m.end())
        out += [source[pos:m.start()], _vector_cast(m.group(0)[1:-1], source[m.end():end])]
        pos = end
    return "".join(out) + source[pos:]


def _vector_cast(vector: str, operand: str) -> str:
    if operand.startswith("(") and not _VECTOR_CAST.match(operand):
        inner = operand[1:-1]
        parts, depth, last = [], 0, 0
        for i, c in enumerate(inner):
            depth += {"(": 1, ")": -1}.get(c, 0)
            if c == "," and depth == 0:
                parts.append(inner[last:i])
                last = i + 1
        if parts:  # a vector literal
            return f"metal::{vector}{{{', '.join(_metal_vector_conversions(p) for p in [*parts, inner[last:]])}}}"
    return f"metal::mlcbuild_convert<metal::{vector}>({_metal_vector_conversions(operand)})"


def _operand_end(source: str, i: int) -> int:
    """The end of the cast's operand starting at ``i``: a name or a parenthesised expression with its
    calls, subscripts and members, or a dereference of a cast pointer or another cast, recursively."""
    nested = _VECTOR_CAST.match(source, i)
    if nested:
        return _operand_end(source, nested.end())
    if source.startswith("*(", i):  # *(device half4*)operand
        return _operand_end(source, source.index(")", i + 2) + 1)
    i += len(re.match(r"[\w.]*", source[i:]).group(0))  # a name (or nothing, before a parenthesis)
    while i < len(source) and source[i] in "([.":  # then calls, subscripts, members: postfix binds first
        if source[i] == ".":
            i += 1 + len(re.match(r"\w*", source[i + 1:]).group(0))
            continue
        close, depth = {"(": ")", "[": "]"}[source[i]], 0
        for j in range(i, len(source)):
            depth += 1 if source[j] == source[i] else -1 if source[j] == close else 0
            if depth == 0:
                i = j + 1
                break
    return i


# ---- WebGPU: the wasm links with TVM's web runtime; every WGSL kernel validates on wgpu ----------------


def _wgsl_shaders(library: bytes) -> dict[str, str]:
    """name -> WGSL source of every kernel in a WebGPU library (length-prefixed strings)."""
    shaders = {}
    for m in re.finditer(rb"//-{40}\n// Function: (\w+)\n", library):
        length = struct.unpack_from("<Q", library, m.start() - 8)[0]
        shaders[m.group(1).decode()] = library[m.start(): m.start() + length].decode()
    return shaders


@pytest.fixture(scope="module")
def wgpu_device():
    wgpu = pytest.importorskip("wgpu")
    adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
    _need(adapter is not None, "no WebGPU adapter (apt-get install mesa-vulkan-drivers for lavapipe)")
    # What a page loading a bundle asks its adapter for (as WebLLM does): the kernels' storage buffers
    # and 32 KiB of workgroup storage (devices.py: the webgpu target; WebGPU guarantees only 16 KiB).
    # f16 kernels (q4f16_1, q0f16) need the shader-f16 feature, which WebLLM asks for as well.
    _need("shader-f16" in adapter.features, "the WebGPU adapter has no shader-f16")
    return adapter.request_device_sync(required_features=["shader-f16"],
                                       required_limits={"max_storage_buffers_per_shader_stage": 10,
                                                        "max_compute_workgroup_storage_size": 32768})


def test_webgpu_wasm_and_every_wgsl_kernel_validate(built, wgpu_device):
    manifest, library = _library(built["bundles"]["webgpu"])
    assert library[:4] == b"\0asm"
    node = shutil.which("node") or shutil.which("nodejs")
    if node:  # a JS engine's WebAssembly validator (node comes with emscripten)
        path = built["bundles"]["webgpu"] / manifest.library.file
        valid = subprocess.run([node, "-e", f"process.exit(WebAssembly.validate(require('fs').readFileSync('{path}')) ? 0 : 1)"])
        assert valid.returncode == 0
    _assert_wgsl_kernels_validate(library, wgpu_device)


def _assert_wgsl_kernels_validate(library: bytes, wgpu_device) -> None:
    shaders = _wgsl_shaders(library)
    assert len(shaders) > 20
    for name, source in shaders.items():
        module = wgpu_device.create_shader_module(code=source)  # naga parses and validates
        wgpu_device.create_compute_pipeline(layout="auto", compute={"module": module, "entry_point": name})


def test_webgpu_decode_kernels_run_through_wgpu_like_the_cpu(built, wgpu_device):
    """Each static kernel of the model's decode step, as WGSL, dispatched on wgpu (lavapipe here) with
    random inputs, against the same function compiled for the CPU. (The decode step as a whole needs
    TVM's runtime hosted with a WebGPU device, which is tvmjs in a browser: Python's wgpu cannot host it.)"""
    from webgpu_kernels import build_wgsl, decode_kernels, grid_of, random_inputs, run_cpu, run_wgsl

    chat = json.loads((built["bundles"]["webgpu"] / bf.CHAT_CONFIG_FILE).read_text())
    target = {**parse_device("webgpu").spec.target(None), "host": {"kind": "llvm"}}
    kernels = decode_kernels(chat, target)
    names = [name for name, _, _ in kernels]
    assert any("dequantize" in n and "matmul" in n for n in names) and any("rms_norm" in n for n in names), names
    for name, before, after in kernels:
        arrays = random_inputs(before)
        expected = run_cpu(before, name, arrays)
        got = run_wgsl(wgpu_device, build_wgsl(after, name, target), f"{name}_kernel", after, arrays, grid_of(after))
        for want, have in zip(expected, got):
            np.testing.assert_allclose(have, want, rtol=1e-4, atol=1e-4, err_msg=name)


# ---- Android: the static tar MLC ships for its Android app, linked by an NDK's clang ---------------------

def _standin_ndk(root: Path) -> Path:
    """An NDK-shaped directory whose aarch64-linux-android24-clang is LLVM's clang + lld for that target.
    The real NDK (not packaged by Debian, not on PyPI) drives the same clang and lld with Android's
    sysroot; the build only links the objects into a throwaway shared object to prove the app's link
    would take them, which needs no sysroot (-nostdlib, symbols of TVM's runtime left unresolved)."""
    from mlcbuild.toolchain import tool_command

    clang = shutil.which("clang-14") or shutil.which("clang")
    lld = tool_command("ld.lld")  # lld-19 installs it as ld.lld-19 where no other package gives ld.lld
    _need(clang is not None and lld is not None,
          "clang and ld.lld are missing (they come with emscripten and lld-19)")
    ndk = root / "android-ndk-standin"
    bin_dir = ndk / "toolchains" / "llvm" / "prebuilt" / "linux-x86_64" / "bin"
    bin_dir.mkdir(parents=True)
    (ndk / "source.properties").write_text("Pkg.Desc = Android NDK (stand-in: LLVM clang + lld)\nPkg.Revision = 27.0.0-standin\n")
    wrapper = bin_dir / "aarch64-linux-android24-clang"
    wrapper.write_text(f'#!/bin/sh\nexec {clang} --target=aarch64-linux-android24 -fuse-ld=lld --ld-path={lld} -nostdlib "$@"\n')
    wrapper.chmod(0o755)
    return ndk


def test_android_bundle_is_a_static_tar_of_aarch64_android_objects_with_opencl_kernels(built, tmp_path):
    """`android` with $ANDROID_NDK set: lib/model.tar of aarch64 ELF objects (the host code, and devc.o
    holding the OpenCL C kernels: one per kernel of the CUDA build), which the NDK's clang links; the
    manifest names the NDK revision, which is also in the compile key. Shares the other devices' weights."""
    root = built["root"]
    ndk = _standin_ndk(root)
    (root / "android.yaml").write_text(RECIPE.replace("name: tiny-devices", "name: tiny-android")
                                       .replace(f"devices: [{', '.join(DEVICES)}]", "devices: [android]"))
    env = {**built["env"], "ANDROID_NDK": str(ndk)}
    done = subprocess.run([sys.executable, "-m", "mlcbuild", "run", str(root / "android.yaml"), "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["stage"] for e in events if e["event"] == "node_start"] == ["compile", "package"]  # weights reused
    bundle = root / "dist" / "tiny-android" / bf.bundle_dirname(QUANT, "android")
    verified = subprocess.run([sys.executable, "-m", "mlcbuild", "verify", str(bundle)], capture_output=True, text=True, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    manifest = bf.read_manifest(bundle)
    assert (manifest.library.format, manifest.library.host, manifest.library.gpu) == ("static-tar", "aarch64-android", "opencl")
    assert manifest.tools["android_ndk"] == "27.0.0-standin"

    import tarfile

    with tarfile.open(bundle / manifest.library.file) as tar:
        tar.extractall(tmp_path, filter="data")
    objects = sorted(tmp_path.glob("*.o"))
    assert len(objects) >= 2 and any(o.name.endswith("devc.o") for o in objects), objects
    for obj in objects:
        header = subprocess.run([_llvm_tool("llvm-readelf"), "--file-header", str(obj)], capture_output=True, text=True, check=True).stdout
        assert "AArch64" in header and "REL (Relocatable file)" in header, header
    devc = next(o for o in objects if o.name.endswith("devc.o")).read_bytes()
    from mlcbuild.compiler.build import system_lib_prefix

    # A system library's symbols carry the model's prefix (several models link into one app); a GPU
    # function may be several kernels (name_kernel, name_kernel_1, ...: one per batch-size branch).
    prefix = system_lib_prefix(json.loads((bundle / bf.CHAT_CONFIG_FILE).read_text())).encode()
    names = re.findall(rb"__kernel void (?:__attribute__\(\([^)]*\)\) )?(\w+)\(", devc)
    assert names and all(name.startswith(prefix) for name in names), (prefix, names[:3])
    opencl_kernels = {re.sub(rb"_kernel_\d+$", b"_kernel", name.removeprefix(prefix)) for name in names}
    _, cuda = _library(built["bundles"]["cuda:sm_90"])
    cuda_kernels = {re.sub(rb"_kernel_\d+$", b"_kernel", name) for name in
                    re.findall(rb"extern \"C\" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(", cuda)}
    assert cuda_kernels and opencl_kernels == cuda_kernels  # one GPU function each: kernels per batch size differ



def test_web_runtime_rebuilds_byte_identical(built):
    """TVM's web runtime rebuilt from scratch gives the same bytes (no temp path in its objects): the
    webgpu compile that links it keeps its key, so nothing else rebuilds."""
    done = subprocess.run([sys.executable, "-m", "mlcbuild", "run", str(built["root"] / "tiny.yaml"), "--json",
                           "--force-stage", "web_runtime"], capture_output=True, text=True, env=built["env"], timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [e["node"] for e in events if e["event"] == "node_start"] == ["web_runtime"]
    assert any(e["event"] == "node_cached" and e["node"] == "compile[q4f32_1,webgpu]" for e in events)


# ---- the demo model's shapes: f16 kernels with 64-wide heads (a tiny model's 16-wide f32 ones hid these) --

def test_smollm2_shaped_f16_model_builds_for_metal_and_webgpu(tmp_path, request, device_cache, built):
    """SmolLM2-135M's layer shapes at q4f16_1 (hidden 576, 9 heads of 64, 3 KV heads, MLP 1536), one
    layer: Metal has no 8-wide half vectors (the GEMV's loads are capped at 4 lanes there) and TVM's
    tree-attention kernel for a 64-wide f16 head needs 16.6 KiB of workgroup storage (WebGPU's limit is
    the adapter's, asked for). Every Metal shader parses; every WGSL kernel validates on wgpu."""
    problems = [p for d in ("metal", "webgpu") for p in build_problems(d)]
    _need(not problems, "toolchains missing (see mlcbuild doctor): " + "; ".join(problems))
    from compiler_harness import TINY, make_checkpoint
    from runtime_support import write_tokenizer

    write_tokenizer(make_checkpoint("llama", tmp_path / "src", hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                                    num_attention_heads=9, num_key_value_heads=3), TINY["vocab_size"])
    (tmp_path / "shaped.yaml").write_text("name: shaped\nsource: src\nconv_template: auto\nquantization: [q4f16_1]\n"
                                          "devices: [metal, webgpu]\n"
                                          "overrides:\n  context_window_size: 2048\n  prefill_chunk_size: 512\n")
    env = clean_env(MLCBUILD_CACHE_DIR=str(device_cache), MLCBUILD_VERIFY_CACHE=str(tmp_path / "verified"))
    done = subprocess.run([sys.executable, "-m", "mlcbuild", "run", str(tmp_path / "shaped.yaml"), "--json", "--keep-going"],
                          capture_output=True, text=True, env=env, timeout=900)
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "node_failed"]
    assert done.returncode == 0 and not failed, json.dumps(failed, indent=1) + done.stderr[-2000:]
    # TVM's web runtime is a node of its own: the other recipe built it in this cache, this one reuses it
    assert [e["event"] for e in events if e.get("node") == "web_runtime"][:1] == ["node_cached"]
    dist = tmp_path / "dist" / "shaped"
    _, metal = _library(dist / bf.bundle_dirname("q4f16_1", "metal"))
    (tmp_path / "metal").mkdir()
    _assert_metal_shaders_parse(metal, tmp_path / "metal")
    _, webgpu = _library(dist / bf.bundle_dirname("q4f16_1", "webgpu"))
    # (wgpu's adapter only now: made before torch is imported, the two crash the process)
    _assert_wgsl_kernels_validate(webgpu, request.getfixturevalue("wgpu_device"))
