"""The run journal: a no-op rerun answered by stat alone, and every change that must not be."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mlcbuild.launcher import _noop_request
from mlcbuild.pipeline import journal

HERE = Path(__file__).parent


def age(root: Path, seconds: float = 60.0) -> None:
    """Make every file and directory under ``root`` older than the journal's racy window, as
    they would be on a rerun minutes after the build."""
    past = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "cache" in dirnames:
            dirnames.remove("cache")  # the cache is written by runs, not read for keys
        for name in filenames:
            os.utime(Path(dirpath) / name, (past, past), follow_symlinks=False)
        os.utime(dirpath, (past, past))


def events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def done(proc) -> dict:
    return next(e for e in events(proc) if e["event"] == "run_done")


def journaled(ws) -> dict:
    """Build with inputs older than the racy window (a recipe and sources edited minutes ago):
    the building run writes the journal. Returns the node_cached events a full rerun reports.
    (The Python modules count as inputs too: within 2 s of editing one, no journal is written.)"""
    age(ws.root)
    built = ws.launch("run", "toy.yaml", "--json")
    assert done(built)["built"] == 13 and ws.ran()
    assert list((ws.cache / "journal").glob("*.json")), f"a successful run writes a journal\n{built.stderr}"
    full = ws.run_json()  # the full CLI, which never reads a journal
    assert "journal" not in full[-1] and full[-1]["cached"] == 13
    return {e["node"]: e for e in full if e["event"] == "node_cached"}


def test_noop_rerun_is_replayed_from_the_journal(ws):
    full = journaled(ws)
    fast = ws.launch("run", "toy.yaml", "--json", "-j", "2")
    assert done(fast)["journal"] is True and done(fast)["ok"] and done(fast)["cached"] == len(full)
    assert {e["node"]: e for e in events(fast) if e["event"] == "node_cached"} == full  # same keys
    assert ws.ran() == []
    human = ws.launch("run", "toy.yaml")
    assert "no input changed since the last run" in human.stderr
    assert f"outputs in {ws.root / 'dist' / 'toy'}" in human.stderr
    assert human.stderr.count("cached ") == len(full)


def test_writing_a_journal_prunes_those_unused_for_weeks(ws):
    stale, recent = ws.cache / "journal" / "stale.json", ws.cache / "journal" / "recent.json"
    stale.parent.mkdir(parents=True)
    for path, days in ((stale, journal.UNUSED_DAYS + 1), (recent, journal.UNUSED_DAYS - 1)):
        path.write_text("{}")
        os.utime(path, (time.time() - days * 86400,) * 2)
    journaled(ws)
    assert not stale.exists() and recent.exists()
    # a replay marks its journal used
    (written,) = [p for p in (ws.cache / "journal").glob("*.json") if p not in (stale, recent)]
    os.utime(written, (time.time() - 86400,) * 2)
    assert done(ws.launch("run", "toy.yaml", "--json"))["journal"] is True
    assert time.time() - written.stat().st_mtime < 60


def test_young_inputs_write_no_journal(ws):
    # A recipe edited just now could change again within the same mtime tick without its stat
    # changing, so no journal may vouch for it yet. (Its mtime is set ahead of the clock so that
    # it stays young however slowly the runs go.)
    age(ws.root)
    ahead = time.time() + 600
    os.utime(ws.recipe, (ahead, ahead))
    ws.launch("run", "toy.yaml", "--json")
    ws.launch("run", "toy.yaml", "--json")
    assert not list((ws.cache / "journal").glob("*.json"))


def test_a_failed_run_drops_the_journal(ws):
    ws.env["FAKE_COMPILE_FAIL"] = "cuda:sm_90"  # a device the recipe does not have yet
    journaled(ws)
    ws.recipe.write_text(ws.recipe.read_text().replace("[cpu, cuda:sm_80]", "[cpu, cuda:sm_80, cuda:sm_90]"))
    assert ws.launch("run", "toy.yaml", "--json", check=False).returncode == 1
    assert not list((ws.cache / "journal").glob("*.json"))


def _edit_source(ws):
    (ws.root / "src" / "a.txt").write_text("alphA\nbeta\n")  # same size


def _add_source_file(ws):
    (ws.root / "src" / "c.txt").write_text("new\n")


def _edit_recipe(ws):
    ws.recipe.write_text(ws.recipe.read_text().replace("512", "1024"))


def _delete_output(ws):
    (ws.root / "dist" / "toy" / "q0f16-cpu" / "lib.so").unlink()


def _forget_record(ws):
    key = next(e["key"] for e in ws.run_json() if e.get("node") == "compile[q0f16,cpu]")
    ws.mlcbuild("cache", "rm", key)


CHANGES = {
    # change -> (env for the rerun, nodes that must run, check afterwards)
    "source file edited in place": (_edit_source, {}, None),
    "file added to the source dir": (_add_source_file, {}, None),
    "recipe edited": (_edit_recipe, {}, None),
    "toolchain fact from the environment": (None, {"FAKE_CC_VERSION": "2.0"}, None),
    "bundle file deleted": (_delete_output, {}, lambda ws: (ws.root / "dist/toy/q0f16-cpu/lib.so").is_file()),
    "cache record forgotten": (_forget_record, {}, None),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_that_can_change_a_key_is_a_miss(ws, change):
    make, env, after = CHANGES[change]
    journaled(ws)
    if make is not None:
        make(ws)
    proc = ws.launch("run", "toy.yaml", "--json", env=env)
    assert "journal" not in done(proc), f"{change}: replayed a stale journal"
    assert done(proc)["ok"]
    if after is not None:
        assert after(ws)
    if make in (_edit_source, _add_source_file, _edit_recipe, _forget_record) or env:
        assert ws.ran(), f"{change}: nothing was rebuilt"


def test_editing_a_stage_module_is_a_miss(ws):
    # A stage's code decides its key (its version, params, toolchain): the journal watches the
    # file of every module loaded when it was written.
    plugins = ws.root / "plugins"
    plugins.mkdir()
    shutil.copy(HERE / "fake_stages.py", plugins / "fake_stages.py")
    ws.env["PYTHONPATH"] = os.pathsep.join([str(plugins), *ws.env["PYTHONPATH"].split(os.pathsep)[1:]])
    journaled(ws)
    assert done(ws.launch("run", "toy.yaml", "--json"))["journal"] is True
    with open(plugins / "fake_stages.py", "a") as handle:
        handle.write("\n# edited\n")
    assert "journal" not in done(ws.launch("run", "toy.yaml", "--json"))


@pytest.mark.parametrize("argv, expected", [
    (["run", "r.yaml"], ("r.yaml", None, False)),
    (["run", "--json", "r.yaml", "-j", "3", "--cache-dir", "c", "-k"], ("r.yaml", "c", True)),
    (["run", "r.yaml", "--jobs=2", "--cache-dir=c"], ("r.yaml", "c", False)),
    (["run", "r.yaml", "--force"], None),  # must rebuild
    (["run", "r.yaml", "--device", "cpu"], None),  # a selection: another outcome
    (["run", "r.yaml", "-j", "0"], None),  # the full CLI refuses it
    (["run", "r.yaml", "-j"], None),
    (["run", "r.yaml", "-j=2"], None),
    (["run", "r.yaml", "--json=1"], None),
    (["run", "r.yaml", "--cache-dir="], None),  # the full CLI reads "" as the current directory
    (["run", "a.yaml", "b.yaml"], None),
    (["run"], None),
    (["plan", "r.yaml"], None),
])
def test_only_a_plain_run_is_answered_from_the_journal(argv, expected):
    assert _noop_request(argv) == expected
