"""The WebGPU library: a wasm module linked with TVM's web runtime (tvmjs), as WebLLM loads it.

MLC LLM links every model's wasm with three bitcode files of TVM's web runtime (``wasm_runtime.bc``,
``tvmjs_support.bc``, ``webgpu_runtime.bc``), built with emscripten from TVM's ``web/emcc`` sources.
The apache-tvm wheel ships those sources and most of the runtime sources they include, but not nine
headers (TVM's ``include/tvm/support``, ``src/support`` and ``3rdparty/compiler-rt/builtin_fp16.h``):
``tvm_sources/`` holds those, copied unchanged from apache/tvm (Apache-2.0, commit 5d4dc87213).
:func:`build_tvmjs_runtime` builds the bitcode (about 60 s on one core): in the pipeline, as the
``web_runtime`` node the webgpu compiles take as input (cached, and shared through a remote cache,
like any node); :func:`link_tvmjs_wasm` is the ``export_library`` linker (seconds).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

SOURCES = Path(__file__).resolve().parent / "tvm_sources"
RUNTIME_PARTS = ("wasm_runtime", "tvmjs_support", "webgpu_runtime")
RUNTIME_SUBDIR = Path("web") / "dist" / "wasm"  # where TVM's linker looks under TVM_HOME
# The runtime a compile links against, when the pipeline gave it one (use_runtime).
_RUNTIME_HOME: ContextVar[Path | None] = ContextVar("mlcbuild_tvmjs_runtime", default=None)


def sources_digest() -> str:
    """sha256 over the vendored headers (a toolchain fact of webgpu compiles)."""
    digest = hashlib.sha256()
    for path in sorted(SOURCES.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(SOURCES).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def runtime_facts() -> dict[str, str]:
    """What the web runtime's bytes depend on: TVM (whose wheel ships its sources), emcc, and the
    headers vendored here (the ``web_runtime`` node's toolchain facts)."""
    from mlcbuild.toolchain import tool_version, tvm_version

    return {"tvm": tvm_version(), "emcc": tool_version("emcc"), "tvmjs_sources": sources_digest()}


def tvmjs_runtime_dir() -> Path:
    """A TVM_HOME-like directory whose ``web/dist/wasm`` holds TVM's web runtime bitcode for the
    installed TVM and emcc: the one :func:`use_runtime` names (the pipeline's ``web_runtime`` node),
    else one built on first use under the cache dir (by atomic rename)."""
    given = _RUNTIME_HOME.get()
    if given is not None:
        return given
    from mlcbuild.cache.location import default_cache_dir

    key = hashlib.sha256("\n".join(runtime_facts().values()).encode()).hexdigest()[:24]
    home = Path(default_cache_dir()) / "tvmjs-runtime" / key
    if all((home / RUNTIME_SUBDIR / f"{part}.bc").is_file() for part in RUNTIME_PARTS):
        return home
    home.parent.mkdir(parents=True, exist_ok=True)
    final = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=home.parent))
    try:
        build_tvmjs_runtime(final)
        try:
            os.replace(final, home)
        except OSError:  # another process built it meanwhile
            pass
    finally:
        shutil.rmtree(final, ignore_errors=True)
    return home


def build_tvmjs_runtime(home: Path) -> None:
    """Build TVM's web runtime (``RUNTIME_PARTS``) with emcc into ``home / RUNTIME_SUBDIR``."""
    import tvm
    import tvm_ffi

    if shutil.which("emcc") is None:
        raise RuntimeError("emcc is not on PATH: apt-get install emscripten")
    tvm_dir, ffi_dir = Path(tvm.__file__).parent, Path(tvm_ffi.__file__).parent
    work = Path(tempfile.mkdtemp(prefix="tvmjs-build-"))
    try:
        # TVM's source layout, assembled from the wheel and the vendored headers (the sources
        # include each other by relative paths, so these are copies, not links)
        shutil.copytree(tvm_dir / "src", work / "src")
        shutil.copytree(tvm_dir / "include", work / "include")
        shutil.copytree(tvm_dir / "web" / "emcc", work / "web" / "emcc")
        shutil.copytree(ffi_dir / "include", work / "3rdparty" / "tvm-ffi" / "include")
        shutil.copytree(ffi_dir / "src", work / "3rdparty" / "tvm-ffi" / "src")
        shutil.copytree(ffi_dir / "3rdparty" / "dlpack", work / "3rdparty" / "tvm-ffi" / "3rdparty" / "dlpack")
        shutil.copytree(SOURCES, work, dirs_exist_ok=True)
        out = home / RUNTIME_SUBDIR
        out.mkdir(parents=True, exist_ok=True)
        # Paths relative to the work dir (emcc runs there): its temp name would otherwise be in the
        # objects (lambda names in __PRETTY_FUNCTION__ strings), and no two builds the same bytes.
        flags = ["-I.", "-Iinclude", "-I3rdparty/tvm-ffi/include", "-I3rdparty/tvm-ffi/3rdparty/dlpack/include",
                 "-O2", "-std=c++17", "-Wno-ignored-attributes"]
        for part in RUNTIME_PARTS:
            # wasm objects under the .bc names TVM's linker looks for (wasm-ld reads either by
            # their magic): with bitcode, every model's link re-optimizes the whole runtime (LTO,
            # ~3 minutes); objects were optimized once, here
            cmd = ["emcc", *flags, "-c", "-o", str((out / f"{part}.bc").resolve()), f"web/emcc/{part}.cc"]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
            if done.returncode != 0:
                raise RuntimeError(f"building TVM's web runtime ({part}.cc) with emcc failed:\n{done.stderr[-4000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def use_runtime(home: Path) -> Iterator[None]:
    """Link webgpu libraries against the web runtime in ``home`` (a ``web_runtime`` node's output)."""
    token = _RUNTIME_HOME.set(home)
    try:
        yield
    finally:
        _RUNTIME_HOME.reset(token)


def link_tvmjs_wasm(output: str, objects: list[str], options: Any = None) -> None:
    """``export_library`` linker of a WebGPU library: TVM's ``create_tvmjs_wasm`` with the runtime
    bitcode of :func:`tvmjs_runtime_dir`."""
    from tvm.support import emcc

    home = tvmjs_runtime_dir()
    previous = os.environ.get("TVM_HOME")
    os.environ["TVM_HOME"] = str(home)
    try:
        # -O1 at link time: the objects are optimized already; emcc's -O3 (TVM's default) runs
        # binaryen over the whole module, 2 minutes per model for 35% smaller glue code
        emcc.create_tvmjs_wasm(output, objects, [*(options or []), "-O1"])
    finally:
        if previous is None:
            os.environ.pop("TVM_HOME", None)
        else:
            os.environ["TVM_HOME"] = previous


# Objects, not bitcode: TVM's LLVM (22) writes bitcode the emscripten linker (LLVM 14 in Debian 12) cannot
# read; wasm object files it links.
link_tvmjs_wasm.object_format = "o"  # type: ignore[attr-defined]
