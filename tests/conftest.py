"""Shared fixtures. Compiler fixtures (tiny checkpoints, compiled model parts) are session
scoped and memoized per (architecture, quantization, device): a library is built once per run
however many tests read it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from subprocess_env import clean_env


@pytest.fixture(scope="session")
def compiler_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compiler")


@pytest.fixture(scope="session")
def tiny_checkpoint(compiler_root: Path) -> Callable[..., Path]:
    """tiny_checkpoint(arch, **hf_overrides) -> directory of a tiny random HF checkpoint."""
    from compiler_harness import make_checkpoint

    made: dict[tuple, Path] = {}

    def get(arch: str, **overrides: Any) -> Path:
        key = (arch, repr(sorted(overrides.items())))
        if key not in made:
            name = f"{arch}-{len(made)}"
            made[key] = make_checkpoint(arch, compiler_root / "checkpoints" / name, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="session")
def built_model(compiler_root: Path, tiny_checkpoint: Callable[..., Path]) -> Callable[..., dict[str, Path]]:
    """built_model(arch, quantization, device="cpu", **hf_overrides) -> {"config", "weights",
    "library"} output directories of the three compiler stages."""
    from compiler_harness import build_parts

    built: dict[tuple, dict[str, Path]] = {}

    def get(arch: str, quantization: str, device: str = "cpu", **overrides: Any) -> dict[str, Path]:
        key = (arch, quantization, device, repr(sorted(overrides.items())))
        if key not in built:
            checkpoint = tiny_checkpoint(arch, **overrides)
            root = compiler_root / "built" / f"{checkpoint.name}-{quantization}-{device.replace(':', '-')}"
            built[key] = build_parts(checkpoint, root, quantization, device)
        return built[key]

    return get


DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "smollm2-135m-instruct.yaml"




@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The offline demo recipe, copied into a temp dir (its bundles land beside it) and built there
    with its own cache, pushing every node it builds to a file:// remote cache at
    ``<dir>/remote`` (the remote cache tests pull from it into other working copies)."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("demo")
    recipe = root / DEMO_RECIPE.name
    shutil.copy(DEMO_RECIPE, recipe)
    env = clean_env(MLCBUILD_CACHE_DIR=str(root / "cache"))
    done = subprocess.run([sys.executable, "-m", "mlcbuild.cli", "run", str(recipe),
                           "--remote-cache", (root / "remote").as_uri()], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    return recipe
