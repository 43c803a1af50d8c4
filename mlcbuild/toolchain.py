"""Facts about this machine's build tools that enter node keys (cheap: no tvm import).

Each probe that costs a subprocess is computed once per tool identity (path, size, mtime) and kept
in a small file under the cache dir: a no-op rerun must not pay a second per fact.

Questions for TVM (``tvm_probe``) run in a child Python, so planning never imports tvm, except in a
process that has imported it already or that builds nodes (``$MLCBUILD_BUILDER_PROCESS`` set, as a
Ray worker sets it): that process imports tvm to compile anyway, and one import there is cheaper than
a child Python per question (on a fresh worker machine, three of them cost seconds per node).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from mlcbuild.atomicfile import write_atomic
from mlcbuild.cache.location import default_cache_dir
from mlcbuild.hostinfo import cpu_identity


def tvm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("apache-tvm")
    except PackageNotFoundError:
        return "unknown"


def _facts_dir() -> Path:
    path = Path(default_cache_dir()) / "host-facts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def memo(key: str, compute: Callable[[], str]) -> str:
    """A host fact computed once per key and kept in a small file under the cache dir (the
    computation costs a second; the no-op rerun budget does not allow that every time)."""
    path = _facts_dir() / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    value = compute()
    write_atomic(path, value)
    return value


BUILDER_PROCESS_ENV = "MLCBUILD_BUILDER_PROCESS"


def _llvm_system_cpu() -> str:
    from tvm.target import codegen

    return str(codegen.llvm_get_system_cpu())


def _llvm_valid_cpu(name: str, triple: str) -> str:
    from tvm.target import codegen

    return str(int(bool(codegen.llvm_is_valid_cpu(name, triple))))


def _tvm_codegens(*names: str) -> str:
    import json

    import tvm

    return json.dumps([n for n in names if tvm.get_global_func("target.build." + n, allow_missing=True) is not None])


TVM_PROBES: dict[str, Callable[..., str]] = {
    "llvm-system-cpu": _llvm_system_cpu, "llvm-valid-cpu": _llvm_valid_cpu, "codegens": _tvm_codegens}


def tvm_probe(name: str, *args: str) -> str:
    """The answer of TVM_PROBES[name](*args), asked in this process where tvm is (or will be)
    imported anyway, in a child Python otherwise (see the module docstring)."""
    if "tvm" in sys.modules or os.environ.get(BUILDER_PROCESS_ENV):
        return TVM_PROBES[name](*args)
    done = subprocess.run([sys.executable, "-m", "mlcbuild.toolchain", name, *args],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


def host_cpu() -> str:
    """LLVM's name for this host's CPU (e.g. "znver3", "sapphirerapids"), memoized by the
    /proc/cpuinfo model name and feature flags so a different CPU gets a fresh answer."""
    return memo("host-cpu\n" + cpu_identity(), lambda: tvm_probe("llvm-system-cpu"))


def tool_command(name: str, min_version: int = 0) -> str | None:
    """``name`` as found on PATH, or Debian's versioned name of it (``ld64.lld-19``: the highest
    version present) when the plain name is not installed; None when neither is. With
    ``min_version``, only versioned names of at least that version count."""
    found = shutil.which(name) if not min_version else None
    if found:
        return found
    versions = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        try:
            entries = os.listdir(directory or ".")
        except OSError:
            continue
        for entry in entries:
            suffix = entry[len(name) + 1:] if entry.startswith(name + "-") else ""
            if suffix.isdigit() and int(suffix) >= min_version and os.access(os.path.join(directory, entry), os.X_OK):
                versions.append((int(suffix), os.path.join(directory, entry)))
    return max(versions)[1] if versions else None


def tool_path(name: str, min_version: int = 0) -> Path | None:
    """The resolved executable of :func:`tool_command`, or None."""
    found = tool_command(name, min_version)
    return Path(os.path.realpath(found)) if found else None


def tool_version(name: str, args: tuple[str, ...] = ("--version",), line: int = 0, min_version: int = 0) -> str:
    """Line ``line`` of ``name --version`` (memoized by the executable's identity), or "absent"."""
    found = tool_command(name, min_version)
    path = Path(os.path.realpath(found)) if found else None
    if path is None or found is None:
        return "absent"
    stat = path.stat()

    def compute() -> str:
        # run by the name found on PATH: multi-call binaries (lld) read what they were called as
        result = subprocess.run([found, *args], capture_output=True, text=True, check=True)
        lines = [ln.strip() for ln in (result.stdout or result.stderr).strip().splitlines() if ln.strip()]
        return lines[line] if lines else "unknown"

    return memo(f"{name}\n{' '.join(args)}\n{line}\n{path}\n{stat.st_size}\n{stat.st_mtime_ns}", compute)


def nvcc_version() -> str:
    return tool_version("nvcc", line=-1)


def nvcc_files(device: str) -> list[Path]:
    """The nvcc executable (resolved) whose version a stage building for ``device`` records."""
    from mlcbuild.devices import parse_device

    nvcc = tool_path("nvcc") if parse_device(device).kind == "cuda" else None
    return [nvcc] if nvcc else []


if __name__ == "__main__":  # tvm_probe's child: python -m mlcbuild.toolchain NAME ARGS...
    print(TVM_PROBES[sys.argv[1]](*sys.argv[2:]))
