"""A node's key covers the code that makes its output: the stage's module and every module of its
package it imports, lazily imported ones included (pipeline.code_digest)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mlcbuild.cache.digests import StatCache
from mlcbuild.pipeline import code_digest

# A package whose stage module reaches its modules in every way the closure must follow.
PACKAGE = {
    "pkg/__init__.py": "from pkg.version import VERSION\n",
    "pkg/version.py": "VERSION = '1'\n",
    "pkg/stages/__init__.py": "",
    "pkg/stages/mystage.py": (
        "import os\n"
        "from .. import helper  # relative; a submodule imported from its package\n"
        "from ..sub import thing  # an attribute of a package: its __init__\n"
        "FAMILIES = {'a': 'pkg.plugins.by_name'}  # a registry imports by name\n"
        "def run():\n"
        "    from pkg.kernels import gemv  # lazy\n"
        "    return gemv.build()\n"
    ),
    "pkg/helper.py": "import pkg.deep.leaf as leaf\n",
    "pkg/deep/__init__.py": "",
    "pkg/deep/leaf.py": "X = 1\n",
    "pkg/sub/__init__.py": "thing = 1\n",
    "pkg/kernels/__init__.py": "",
    "pkg/kernels/gemv.py": "from .tiles import SIZE\ndef build():\n    return SIZE * 2\n",
    "pkg/kernels/tiles.py": "SIZE = 4\n",
    "pkg/plugins/__init__.py": "",
    "pkg/plugins/by_name.py": "",
    "pkg/unused.py": "import pkg.kernels.tiles\n",
}


def write_package(root: Path) -> Path:
    for rel, text in PACKAGE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def closure(root: Path, stat_cache: StatCache, monkeypatch, module: str = "pkg.stages.mystage"):
    with monkeypatch.context() as patch:
        patch.syspath_prepend(str(root))
        return code_digest.code_closure(stat_cache, [module])


def test_closure_follows_lazy_relative_and_by_name_imports(tmp_path, monkeypatch):
    root = write_package(tmp_path / "a")
    files = closure(root, StatCache(tmp_path / "stat.sqlite"), monkeypatch)
    assert [f.relpath for f in files] == sorted(set(PACKAGE) - {"pkg/unused.py"})
    assert all(f.path == root / f.relpath for f in files)


def test_digest_is_the_same_wherever_the_source_is_and_changes_with_a_lazy_module(tmp_path, monkeypatch):
    stat_cache = StatCache(tmp_path / "stat.sqlite")
    first = closure(write_package(tmp_path / "a"), stat_cache, monkeypatch)
    elsewhere = closure(write_package(tmp_path / "elsewhere" / "b"), stat_cache, monkeypatch)
    assert code_digest.code_digest(first) == code_digest.code_digest(elsewhere)
    (tmp_path / "a" / "pkg" / "kernels" / "tiles.py").write_text("SIZE = 8\n")
    edited = closure(tmp_path / "a", stat_cache, monkeypatch)
    assert code_digest.code_digest(edited) != code_digest.code_digest(first)
    assert [f.relpath for f, g in zip(first, edited) if f.digest != g.digest] == ["pkg/kernels/tiles.py"]


def test_import_lists_are_remembered_in_the_stat_cache(tmp_path, monkeypatch):
    root = write_package(tmp_path / "a")
    monkeypatch.setattr(code_digest, "_IMPORTS", {})  # (what earlier tests parsed in this process)
    expected = closure(root, StatCache(tmp_path / "stat.sqlite"), monkeypatch)
    # A new process: nothing in memory, the stat cache's database on disk. Nothing is parsed.
    monkeypatch.setattr(code_digest, "_IMPORTS", {})
    monkeypatch.setattr(code_digest, "_parse_imports", lambda *a: pytest.fail("parsed a file again"))
    assert closure(root, StatCache(tmp_path / "stat.sqlite"), monkeypatch) == expected


def test_the_engine_and_recipe_schema_are_left_out_of_the_compile_stage_code(tmp_path):
    files = {f.relpath for f in code_digest.code_closure(StatCache(tmp_path / "s.sqlite"), ["mlcbuild.stages.compile"])}
    # lazily imported: the kernel schedules, the models (by name from their registry), quantization
    assert {"mlcbuild/stages/compile.py", "mlcbuild/compiler/kernels/cpu_matmul.py",
            "mlcbuild/compiler/kernels/cuda_schedule.py", "mlcbuild/models/llama.py",
            "mlcbuild/quantization/group_quant.py"} <= files
    assert not [f for f in files if f.startswith(("mlcbuild/pipeline/", "mlcbuild/cache/", "mlcbuild/runtime/"))]
    assert not {"mlcbuild/recipe.py", "mlcbuild/stages/__init__.py", "mlcbuild/__init__.py", "mlcbuild/cli.py"} & files


# ---- through the CLI, with a plugin stage whose kernel module is imported lazily ----------------

PLUGIN = {
    "toycode/__init__.py": "",
    "toycode/stages.py": (
        "from fake_stages import FakeCompile, FakeConvert, FakeDownload, FakeGenConfig, FakePackage\n\n\n"
        "class Compile(FakeCompile):\n"
        "    def run(self, ctx):\n"
        "        from toycode.kernels import banner  # lazy: a cached run never imports it\n\n"
        "        super().run(ctx)\n"
        "        with open(ctx.out / 'lib.so', 'a') as handle:\n"
        "            handle.write(banner())\n\n\n"
        "STAGES = [FakeDownload, FakeGenConfig, FakeConvert, Compile, FakePackage]\n"
    ),
    "toycode/kernels.py": "def banner():\n    return 'kernel v1'\n",
}
COMPILES = sorted(f"compile[{q},{d}]" for q in ("q0f16", "q4f16_1") for d in ("cpu", "cuda:sm_80"))
PACKAGES = [name.replace("compile", "package") for name in COMPILES]


@pytest.fixture
def plugin_ws(ws):
    for rel, text in PLUGIN.items():
        (ws.root / "plug" / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws.root / "plug" / rel).write_text(text)
    ws.env["MLCBUILD_STAGE_PLUGINS"] = "toycode.stages"
    ws.env["PYTHONPATH"] = os.pathsep.join([str(ws.root / "plug"), ws.env["PYTHONPATH"]])
    return ws


def edit_kernel(ws) -> None:
    (ws.root / "plug" / "toycode" / "kernels.py").write_text("def banner():\n    return 'kernel v2'\n")


def age(root: Path, seconds: float = 60.0) -> None:
    """Everything under ``root`` but the cache older than the run journal's racy window."""
    past = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        if "cache" in dirnames:
            dirnames.remove("cache")
        for name in filenames:
            os.utime(Path(dirpath) / name, (past, past))
        os.utime(dirpath, (past, past))


def run_done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def test_editing_a_lazily_imported_module_is_explained_and_rebuilt(plugin_ws):
    ws = plugin_ws
    ws.run_json()
    ws.ran()
    edit_kernel(ws)
    plan = ws.mlcbuild("plan", "toy.yaml", "--json").stdout
    entries = {e["node"]: e for e in map(json.loads, plan.splitlines())}
    for name in COMPILES:
        assert entries[name]["action"] == "run" and entries[name]["reason"] == "code changed: toycode/kernels.py"
    assert all(e["action"] == "cached" for n, e in entries.items() if not n.startswith(("compile", "package")))
    ws.run_json()
    assert ws.ran() == sorted(COMPILES + PACKAGES)
    assert (ws.root / "dist/toy/q0f16-cpu/lib.so").read_text().endswith("kernel v2")
    # The same code at another path has the same keys: a second checkout finds everything cached.
    shutil.copytree(ws.root / "plug", ws.root / "elsewhere")
    ws.env["PYTHONPATH"] = ws.env["PYTHONPATH"].replace(str(ws.root / "plug"), str(ws.root / "elsewhere"))
    assert "everything is up to date" in ws.mlcbuild("plan", "toy.yaml").stdout


def test_the_run_journal_notices_an_edit_of_a_module_no_cached_run_imports(plugin_ws):
    ws = plugin_ws
    ws.run_json()
    ws.ran()
    age(ws.root)
    # An all-cached run writes the journal; toycode.kernels was never imported in that process.
    assert "journal" not in run_done(ws.launch("run", "toy.yaml", "--json"))
    assert run_done(ws.launch("run", "toy.yaml", "--json"))["journal"] is True
    edit_kernel(ws)
    proc = ws.launch("run", "toy.yaml", "--json")
    assert "journal" not in run_done(proc) and run_done(proc)["ok"]
    assert ws.ran() == sorted(COMPILES + PACKAGES)
