"""The device registry without compiling anything: recipe errors for bad device strings, `mlcbuild doctor`
and `plan` on a machine that lacks a device's toolchain, and the runtime's device-compatibility check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from subprocess_env import clean_env
from mlcbuild import bundle_format as bf
from mlcbuild.devices import DEVICE_KINDS, build_problems, library_info, parse_device, toolchain_facts
from mlcbuild.recipe import RecipeError, load_recipe

RECIPE = """\
name: r
source: src
quantization: q4f16_1
devices:
  - cpu
  - {device}
"""


def _source(tmp_path: Path) -> None:
    """A checkpoint directory as planning sees it (nothing here reads the weights)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "src" / "model.safetensors").write_bytes(b"")


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlcbuild", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _bare_path(tmp_path: Path) -> str:
    """A PATH holding only this Python: a machine without compilers, linkers or SDKs."""
    bin_dir = tmp_path / "bare-bin"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python").exists():
        (bin_dir / "python").symlink_to(sys.executable)
    return str(bin_dir)


@pytest.mark.parametrize("device, expected", [
    ("rocm:gfx9999", "rocm:gfx9999: not a ROCm GPU target mlcbuild builds for; expected rocm:<gfx>, one of gfx908"),
    ("metal:foo", "metal takes no arch (metal:foo given): write metal"),
    ("cuda:sm_7", "cuda:sm_7: not a CUDA compute capability; expected cuda or cuda:sm_XY"),
    ("cuda:sm_35", "GPUs before sm_50 are not supported"),
    ("cpu:aarch64", "is not an x86-64 CPU: for 64-bit Arm write aarch64"),
    ("cpu:neoverse-v1", "'neoverse-v1' is an Arm CPU: write aarch64:neoverse-v1"),
    ("aarch64:znver4", "LLVM does not know the aarch64 CPU 'znver4'"),
    ("rocm", "rocm needs an arch: rocm:<gfx>"),
    ("tpu", "'tpu' is not a known device; expected one of: cpu or cpu:<mcpu>; aarch64"),
])
def test_bad_device_strings_are_recipe_errors_with_file_and_line(tmp_path, device, expected):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(device=device))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}:6: devices[1]: "), message
    assert expected in message, message


def test_every_device_kind_parses_and_names_its_target(tmp_path):
    written = {"cpu": "cpu:x86-64-v3", "aarch64": "aarch64:neoverse-v1", "cuda": "cuda:sm_80", "rocm": "rocm:gfx942",
               "metal": "metal", "ios": "ios", "webgpu": "webgpu", "vulkan": "vulkan", "android": "android"}
    assert set(written) == set(DEVICE_KINDS)
    import tvm

    for kind, name in written.items():
        device = parse_device(name)
        assert device.name == name and device.dirname == name.replace(":", "-")
        target = tvm.target.Target(device.spec.target(device.arch))  # TVM accepts every kind's target JSON
        assert target.kind.name == {"cpu": "llvm", "aarch64": "llvm", "ios": "metal", "android": "opencl"}.get(kind, kind)
    assert parse_device("aarch64").spec.target(None)["mtriple"] == "aarch64-linux-gnu"
    assert parse_device("rocm:gfx1100").spec.target("gfx1100")["thread_warp_size"] == 32  # RDNA: wave32
    assert parse_device("rocm:gfx942").spec.target("gfx942")["thread_warp_size"] == 64  # CDNA: wave64


def test_toolchain_facts_name_each_devices_tools():
    aarch64 = toolchain_facts(parse_device("aarch64"))
    assert json.loads(aarch64["target"])["mtriple"] == "aarch64-linux-gnu"
    assert "cc" in aarch64 and "aarch64_libc" in aarch64  # the cross compiler's version and its libc enter the key
    multi = toolchain_facts(parse_device("cuda"))
    assert multi["cuda_archs"] == "sm_75,sm_80,sm_86,sm_89,sm_90+compute_90"
    assert "cuda_archs" not in toolchain_facts(parse_device("cuda:sm_90"))


def test_doctor_on_a_machine_without_toolchains_names_what_to_install(tmp_path):
    env = clean_env(PATH=_bare_path(tmp_path), MLCBUILD_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("ANDROID_NDK", None)
    done = _cli("doctor", "--json", env=env)
    assert done.returncode == 0, done.stderr
    rows = {row["device"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert set(rows) == set(DEVICE_KINDS)
    missing = {name: " ".join(row["missing"]) for name, row in rows.items()}
    assert missing["cpu"] == "c++ is not on PATH: apt-get install g++"  # the host linker
    assert "aarch64-linux-gnu-gcc is not on PATH: apt-get install gcc-aarch64-linux-gnu" in missing["aarch64"]
    assert "ld.lld (version 17 or newer) is not on PATH: apt-get install lld-19" in missing["rocm"]
    assert "ld64.lld is not on PATH: apt-get install lld-19" in missing["metal"]
    assert "emcc is not on PATH: apt-get install emscripten" in missing["webgpu"]
    assert "nvcc is not on PATH" in missing["cuda"]
    assert "no vulkan code generator" in missing["vulkan"] and "-DUSE_VULKAN=ON" in missing["vulkan"]
    assert "$ANDROID_NDK is not set" in missing["android"]
    human = _cli("doctor", env=env)
    assert "missing: aarch64-linux-gnu-gcc is not on PATH" in human.stdout
    assert "device kinds can be built on this machine" in human.stdout


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_device_without_its_toolchain_fails_before_any_work(tmp_path, command):
    _source(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(device="aarch64"))
    cache = tmp_path / "cache"
    env = clean_env(PATH=_bare_path(tmp_path), MLCBUILD_CACHE_DIR=str(cache))
    done = _cli(command, str(recipe), env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "this machine cannot build what was asked (nothing was built)" in done.stderr
    assert "aarch64: aarch64-linux-gnu-gcc is not on PATH: apt-get install gcc-aarch64-linux-gnu" in done.stderr
    assert not (cache / "records").exists() or not any((cache / "records").iterdir())
    assert not (tmp_path / "dist").exists()


def test_vulkan_and_android_say_what_they_need(tmp_path, monkeypatch):
    assert "the installed TVM" in " ".join(build_problems("vulkan")) or "vulkan" not in build_problems("vulkan")[0]
    monkeypatch.delenv("ANDROID_NDK", raising=False)
    assert "$ANDROID_NDK is not set" in build_problems("android")[0]
    monkeypatch.setenv("ANDROID_NDK", str(tmp_path))  # a directory that is not an NDK
    assert f"$ANDROID_NDK={tmp_path} is not an NDK" in build_problems("android")[0]
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(device="vulkan"))
    _source(tmp_path)
    done = _cli("plan", str(tmp_path / "recipe.yaml"), env=clean_env(MLCBUILD_CACHE_DIR=str(tmp_path / "cache")))
    assert done.returncode == 2 and "vulkan: the installed TVM (apache-tvm" in done.stderr, done.stderr


# ---- the runtime's device-compatibility check (bundle_format.cannot_run) -------------------------------


def _library(device: str, tvm: str = "0.27.0.post1") -> bf.LibraryInfo:
    return library_info(parse_device(device), tvm)


def test_cuda_bundles_run_where_they_have_code_or_ptx():
    multi = _library("cuda")
    assert multi.gpu_archs == list(bf.CUDA_MULTI_ARCHS) and multi.ptx == "compute_90"
    for gpu in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"):
        assert bf.cannot_run("cuda", multi, "x86_64", "0.27.0", [gpu]) is None, gpu
    assert "the GPU here is sm_70" in bf.cannot_run("cuda", multi, "x86_64", "0.27.0", ["sm_70"])
    sm90 = _library("cuda:sm_90")
    refused = bf.cannot_run("cuda:sm_90", sm90, "x86_64", "0.27.0", ["sm_80"])
    assert "this bundle is for cuda:sm_90 (code for sm_90, PTX compute_90); the GPU here is sm_80" in refused
    assert bf.cannot_run("cuda:sm_80", _library("cuda:sm_80"), "x86_64", "0.27.0", ["sm_86"]) is None  # same major
    assert bf.cannot_run("cuda:sm_80", _library("cuda:sm_80"), "x86_64", "0.27.0", ["sm_90"]) is None  # PTX
    assert bf.cuda_device_runs("cuda:sm_90a", "sm_90") and not bf.cuda_device_runs("cuda:sm_90a", "sm_100")
    assert "this machine has no CUDA GPU" in bf.cannot_run("cuda", multi, "x86_64", "0.27.0", [])


def test_bundles_for_other_machines_and_runtimes_are_refused_with_what_loads_them():
    rocm = bf.cannot_run("rocm:gfx942", _library("rocm:gfx942"), "x86_64", "0.27.0", [])
    assert rocm.startswith("this bundle is for rocm:gfx942; this machine has no ROCm device this runtime drives")
    assert "a TVM runtime built with ROCm" in rocm
    arm = bf.cannot_run("aarch64", _library("aarch64"), "x86_64", "0.27.0", [])
    assert arm.startswith("this bundle is for aarch64 (aarch64 Linux); this machine is x86_64")
    assert bf.cannot_run("aarch64", _library("aarch64"), "aarch64", "0.27.0", []) is None
    web = bf.cannot_run("webgpu", _library("webgpu"), "x86_64", "0.27.0", [])
    assert "WebAssembly module" in web and "WebLLM" in web
    ios = bf.cannot_run("ios", _library("ios"), "x86_64", "0.27.0", [])
    assert "a tar of object files" in ios
    stale = bf.cannot_run("cpu", _library("cpu", tvm="0.26.0"), "x86_64", "0.27.0.post1", [])
    assert stale == ("this bundle's library was built with TVM 0.26.0 (runtime ABI 0.26); this runtime has TVM "
                     "0.27.0.post1 (ABI 0.27): rebuild the bundle with this TVM (mlcbuild run RECIPE), or install "
                     "apache-tvm==0.26.0 to run it")
    assert "older mlcbuild" in bf.cannot_run("cpu", None, "x86_64", "0.27.0", [])
    assert bf.bundle_dirname("q4f16_1", "rocm:gfx942") == "q4f16_1-rocm-gfx942"


def test_the_runtime_refuses_a_bundle_up_front(tmp_path):
    """Bundle.open on bundles this machine cannot run: the message says what the bundle is for and
    what is missing, before TVM's loader sees the library."""
    from mlcbuild.runtime.bundle import Bundle, BundleError

    for device, expected in (("rocm:gfx942", "this bundle is for rocm:gfx942; this machine has no ROCm device"),
                             ("metal", "this bundle is for metal; this machine has no Metal device")):
        bundle = tmp_path / device.replace(":", "-")
        bundle.mkdir()
        manifest = bf.Manifest(name="r", quantization="q4f16_1", device=device, recipe={}, node_keys={}, tools={},
                               library=_library(device), files=[])
        (bundle / bf.MANIFEST_FILE).write_text(manifest.model_dump_json())
        with pytest.raises(BundleError) as info:
            Bundle.open(bundle, device="auto")
        assert expected in str(info.value)


def _fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """(kind, sm) of each entry of a CUDA fatbin: ("elf", 90) is SASS for sm_90, ("ptx", 90) PTX."""
    import struct

    magic, _, header, size = struct.unpack_from("<IHHQ", data, 0)
    assert magic == 0xBA55ED50
    entries, at = [], header
    while at < header + size:
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, at)
        entries.append(({1: "ptx", 2: "elf"}[kind], struct.unpack_from("<I", data, at + 28)[0]))
        at += entry_header + payload
    return entries


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_without_an_arch_builds_one_fatbin_for_every_gpu_since_turing(tmp_path):
    import tvm
    from tvm import te
    from tvm.s_tir import dlight as dl

    from mlcbuild.compiler.build import precompile_cuda
    from mlcbuild.devices import target_dict

    x = te.placeholder((256,), "float32", name="x")
    y = te.compute((256,), lambda i: x[i] * 2.0, name="y")
    target = tvm.target.Target(target_dict(parse_device("cuda")))
    assert target.arch == "sm_75"  # kernels generated for the oldest arch of the set
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.Fallback())(tvm.IRModule({"double": te.create_prim_func([x, y])}))
        lib = tvm.compile(mod, target=target)
        info = precompile_cuda(lib.mod, list(bf.CUDA_MULTI_ARCHS), tmp_path)
    assert info["fatbin"] == "model.cuda.fatbin" and info["arch"] == ",".join(bf.CUDA_MULTI_ARCHS)
    entries = _fatbin_entries((tmp_path / info["fatbin"]).read_bytes())
    assert sorted(sm for kind, sm in entries if kind == "elf") == [75, 80, 86, 89, 90]
    assert [sm for kind, sm in entries if kind == "ptx"] == [90]  # newer GPUs JIT it


def test_tvm_probes_answer_the_same_in_a_child_python_and_in_a_builder_process(tmp_path):
    """Planning asks TVM in a child Python (no tvm import); a Ray worker, which imports tvm to build
    anyway, asks in its own process (MLCBUILD_BUILDER_PROCESS): the facts in the keys must agree."""
    questions = [("llvm-system-cpu",), ("llvm-valid-cpu", "znver4", "x86_64-linux-gnu"),
                 ("llvm-valid-cpu", "no-such-cpu", "x86_64-linux-gnu"), ("codegens", "llvm", "cuda", "vulkan")]
    code = ("import json, sys; from mlcbuild.toolchain import tvm_probe\n"
            "answers = [tvm_probe(*q) for q in json.loads(sys.argv[1])]\n"
            "print(json.dumps([answers, 'tvm' in sys.modules]))")

    def ask(**env: str) -> tuple[list[str], bool]:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(questions)], env=clean_env(**env),
                              capture_output=True, text=True, check=True)
        return tuple(json.loads(done.stdout.strip().splitlines()[-1]))

    planner, planner_imported_tvm = ask()
    builder, builder_imported_tvm = ask(MLCBUILD_BUILDER_PROCESS="1")
    assert not planner_imported_tvm and builder_imported_tvm
    assert planner == builder
    assert planner[1:3] == ["1", "0"] and "llvm" in json.loads(planner[3])
