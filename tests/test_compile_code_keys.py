"""The compile node's key covers the kernel schedules' code: an edit that changes a generated
kernel rebuilds the library without any version bump, and ``plan`` says which file; a schedule
that fails shows in the run's output, the node record and the bundle manifest.

Every edit is made to a copy of the ``mlcbuild`` package in a temporary directory (``PYTHONPATH``
points at the copy), never to the repository's own files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mlcbuild

pytest.importorskip("tvm")

RECIPE = """\
name: codekeys
source: src
quantization: q4f16_1
devices: [cpu]
overrides:
  context_window_size: 128
  prefill_chunk_size: 32
"""
COMPILE = "compile[q4f16_1,cpu]"
BUNDLE = Path("dist/codekeys/q4f16_1-cpu")


class Checkouts:
    """One recipe, one cache, and copies of the mlcbuild package to build it with."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def copy(self, name: str, edit: tuple[str, str, str] | None = None) -> Path:
        """A copy of the package under ``root/name``; ``edit``: (file, old, new) applied to it."""
        code = self.root / name
        shutil.copytree(Path(mlcbuild.__file__).parent, code / "mlcbuild", ignore=shutil.ignore_patterns("__pycache__"))
        if edit is not None:
            path, old, new = edit
            text = (code / path).read_text()
            assert text.count(old) == 1, f"{path} no longer reads as this test expects: {old!r}"
            (code / path).write_text(text.replace(old, new))
        return code

    def mlcbuild(self, code: Path, *args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLCBUILD_")}
        env.update(MLCBUILD_CACHE_DIR=str(self.root / "cache"), PYTHONPATH=str(code))
        proc = subprocess.run([sys.executable, "-m", "mlcbuild.cli", *args], env=env, cwd=self.root,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"mlcbuild {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def plan(self, code: Path) -> dict[str, dict]:
        proc = self.mlcbuild(code, "plan", "codekeys.yaml", "--json")
        return {e["node"]: e for e in map(json.loads, proc.stdout.splitlines())}

    def library(self) -> bytes:
        return (self.root / BUNDLE / "lib" / "model.so").read_bytes()


@pytest.fixture(scope="module")
def checkouts(tmp_path_factory: pytest.TempPathFactory) -> Checkouts:
    """The recipe built once with an unedited copy of the package."""
    from compiler_harness import make_checkpoint

    root = tmp_path_factory.mktemp("codekeys")
    make_checkpoint("llama", root / "src")
    (root / "codekeys.yaml").write_text(RECIPE)
    made = Checkouts(root)
    code = made.copy("base")
    assert made.mlcbuild(code, "run", "codekeys.yaml", "--json").stdout
    made.base_library = made.library()  # type: ignore[attr-defined]
    return made


def test_the_same_code_elsewhere_has_the_same_keys(checkouts):
    plan = checkouts.plan(checkouts.copy("elsewhere"))
    assert {e["action"] for e in plan.values()} == {"cached"}, plan


def test_a_kernel_schedule_edit_rebuilds_the_compile_node_and_plan_says_why(checkouts):
    # Elementwise kernels and norms run in parallel from 16 elements on instead of 32768: the tiny
    # model's kernels are all below the old threshold, so each of them changes. No version moves.
    code = checkouts.copy("edited", ("mlcbuild/compiler/kernels/cpu_generic.py",
                                     "PARALLEL_MIN_ELEMENTS = 1 << 15", "PARALLEL_MIN_ELEMENTS = 1 << 4"))
    plan = checkouts.plan(code)
    assert plan[COMPILE]["action"] == "run"
    assert plan[COMPILE]["reason"] == "code changed: mlcbuild/compiler/kernels/cpu_generic.py"
    # the stages that do not import the kernel schedules are not touched
    assert all(plan[n]["action"] == "cached" for n in ("download", "gen_config[q4f16_1]", "convert_weight[q4f16_1]"))
    events = [json.loads(line) for line in checkouts.mlcbuild(code, "run", "codekeys.yaml", "--json").stdout.splitlines()]
    assert [e["node"] for e in events if e["event"] == "node_done"] == [COMPILE, "package[q4f16_1,cpu]"]
    assert checkouts.library() != checkouts.base_library  # the edit changed generated kernels


def test_a_failing_schedule_shows_in_the_run_output_the_record_and_the_manifest(checkouts):
    # The row-reduction rule (rms_norm) fails after deciding that it applies.
    code = checkouts.copy("failing", ("mlcbuild/compiler/kernels/cpu_generic.py",
                                      "    last = blocks[-1]\n    loops = sch.get_loops(last)\n",
                                      "    raise RuntimeError('injected: the row reduction schedule is broken')\n"))
    run = checkouts.mlcbuild(code, "run", "codekeys.yaml")
    output = run.stdout + run.stderr
    assert "warning" in output and COMPILE in output
    assert "the reduction schedule failed, fell back (RuntimeError: injected: the row reduction schedule is broken)" in output
    manifest = json.loads((checkouts.root / BUNDLE / "manifest.json").read_text())
    fallbacks = manifest["schedule_fallbacks"]
    assert fallbacks and all(f["rule"] == "reduction" for f in fallbacks)
    assert all(f["error"] == "RuntimeError: injected: the row reduction schedule is broken" for f in fallbacks)
    assert all("rms_norm" in f["function"] for f in fallbacks), fallbacks
    assert "lib/schedule-report.json" not in {f["path"] for f in manifest["files"]}  # in the manifest, not the bundle
    key = checkouts.plan(code)[COMPILE]["key"]
    record = json.loads((checkouts.root / "cache" / "records" / key[:2] / f"{key}.json").read_text())
    assert len(record["warnings"]) == len(fallbacks) and all("reduction schedule failed" in w for w in record["warnings"])
