"""An aarch64 Python with the mlcbuild runtime's packages, run on this x86-64 machine under qemu-user.

Why this way: the apache-tvm wheel exists for manylinux aarch64 on PyPI (its runtime library,
libtvm_runtime.so, is all the runtime needs: TVM_USE_RUNTIME_LIB=1), and so do numpy, pydantic,
tokenizers and xxhash; Debian's python3.11 for arm64 (apt-get download, then dpkg -x: nothing is
installed system-wide) runs them under qemu-aarch64. So the aarch64 bundle is loaded and driven by
the real mlcbuild runtime (mlcbuild.runtime.engine.CompiledModel), not by a separate driver.

    python tests/aarch64_python.py DIR     builds DIR (about 200 MB; 10-30 s from local mirrors)
    $MLCBUILD_AARCH64_SYSROOT=DIR          the device tests use it

Needs: qemu-user, dpkg --add-architecture arm64 + apt-get update (for apt-get download), pip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

DEBIAN_PACKAGES = (
    "libc6", "libgcc-s1", "libstdc++6", "libffi8", "zlib1g", "libexpat1", "libbz2-1.0", "liblzma5", "libssl3",
    "libuuid1", "libcrypt1", "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
)
# what `import mlcbuild.runtime.engine` needs, pinned to this machine's versions where it matters
PYPI_PACKAGES = ("numpy", "xxhash", "pydantic", "tokenizers", "ml_dtypes", "platformdirs", "pyyaml", "jinja2")
PYTHON = "usr/bin/python3.11"


def build(root: Path) -> Path:
    """Make ``root`` (atomically: a temp dir, then rename) and return it."""
    from importlib.metadata import version

    root = root.resolve()
    if (root / PYTHON).exists():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    debs = tmp / "debs"
    debs.mkdir(parents=True)
    subprocess.run(["apt-get", "download", *(f"{p}:arm64" for p in DEBIAN_PACKAGES)], cwd=debs, check=True,
                   capture_output=True)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True)
    shutil.rmtree(debs)
    pins = [f"apache-tvm=={version('apache-tvm')}", f"apache-tvm-ffi=={version('apache-tvm-ffi')}"]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tmp / "site"),
                    "--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_28_aarch64",
                    "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:",
                    *pins, *PYPI_PACKAGES], check=True)
    # the runtime loads libtvm_runtime.so only; the compiler library is 240 MB of nothing here
    for lib in (tmp / "site" / "tvm" / "lib").glob("libtvm_compiler*"):
        lib.unlink()
    os.replace(tmp, root)
    return root


def command(root: Path, *args: str) -> list[str]:
    """argv running the aarch64 Python of ``root`` under qemu-aarch64."""
    return ["qemu-aarch64", "-L", str(root), str(root / PYTHON), *args]


def environment(root: Path, repo: Path) -> dict[str, str]:
    """The environment for :func:`command`: the aarch64 packages, then this checkout's mlcbuild."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MLCBUILD_"))}
    env.update(PYTHONPATH=f"{root / 'site'}{os.pathsep}{repo}", TVM_USE_RUNTIME_LIB="1", PYTHONNOUSERSITE="1",
               TVM_NUM_THREADS="1")
    return env


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
