"""The build engine, end to end through the CLI, with stages the tests define."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import time
from pathlib import Path

ALL_NODES = sorted(
    ["download"]
    + [f"gen_config[{q}]" for q in ("q0f16", "q4f16_1")]
    + [f"convert_weight[{q}]" for q in ("q0f16", "q4f16_1")]
    + [f"{s}[{q},{d}]" for s in ("compile", "package") for q in ("q0f16", "q4f16_1") for d in ("cpu", "cuda:sm_80")]
)


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_first_run_builds_everything_and_materializes_bundles(ws):
    events = ws.run_json()
    assert ws.ran() == ALL_NODES
    done = [e for e in events if e["event"] == "run_done"][0]
    assert done["ok"] and done["built"] == len(ALL_NODES)
    bundle = ws.root / "dist" / "toy" / "q4f16_1-cuda-sm_80"
    assert (bundle / "lib.so").read_text().startswith("library for cuda:sm_80")
    assert os.access(bundle / "lib.so", os.X_OK)
    # Materialized files are hard links into the cache, not copies.
    assert (bundle / "lib.so").stat().st_nlink >= 2


def test_second_run_runs_nothing(ws):
    ws.run_json()
    ws.ran()
    events = ws.run_json()
    assert ws.ran() == []
    assert sum(e["event"] == "node_cached" for e in events) == len(ALL_NODES)
    plan = ws.mlcbuild("plan", "toy.yaml").stdout
    assert "everything is up to date" in plan


def test_param_change_reruns_exactly_the_affected_nodes(ws):
    ws.run_json()
    ws.ran()
    ws.recipe.write_text(ws.recipe.read_text().replace("512", "1024"))
    plan = ws.mlcbuild("plan", "toy.yaml").stdout
    assert "params changed: context_window_size: 512 -> 1024" in plan
    ws.run_json()
    # gen_config changes its output, so everything downstream of it re-runs; download does not.
    assert ws.ran() == [n for n in ALL_NODES if n != "download"]


def test_adding_a_device_builds_only_the_new_nodes(ws):
    ws.run_json()
    ws.ran()
    ws.recipe.write_text(ws.recipe.read_text().replace("[cpu, cuda:sm_80]", "[cpu, cuda:sm_80, cuda:sm_90]"))
    ws.run_json()
    assert ws.ran() == sorted(f"{s}[{q},cuda:sm_90]" for s in ("compile", "package") for q in ("q0f16", "q4f16_1"))


def test_early_cutoff_when_upstream_output_is_identical(ws):
    ws.run_json()
    ws.ran()
    # Trailing whitespace changes the source but the download stage strips it: identical output.
    (ws.root / "src" / "a.txt").write_text("alpha   \nbeta\n")
    plan = ws.mlcbuild("plan", "toy.yaml").stdout
    assert "source files changed: a.txt" in plan
    ws.run_json()
    # Nothing between download and package re-runs; package re-runs only because it records the
    # keys of every node that made it (its manifest would otherwise name a stale download key).
    assert ws.ran() == ["download"] + sorted(n for n in ALL_NODES if n.startswith("package"))


def test_toolchain_and_stage_version_changes_are_explained_and_rerun(ws):
    ws.run_json()
    ws.ran()
    plan = ws.mlcbuild("plan", "toy.yaml", env={"FAKE_CC_VERSION": "2.0"}).stdout
    assert "toolchain changed: fakecc: '1.0' -> '2.0'" in plan
    plan = ws.mlcbuild("plan", "toy.yaml", env={"FAKE_COMPILE_VERSION": "2"}).stdout
    assert "stage version changed (1 -> 2)" in plan
    ws.run_json(env={"FAKE_COMPILE_VERSION": "2"})
    # compile re-runs with identical output; package re-runs only to record the new compile keys.
    assert ws.ran() == sorted(n for n in ALL_NODES if n.startswith(("compile", "package")))


def test_input_change_is_named_in_plan(ws):
    ws.run_json()
    ws.ran()
    (ws.root / "src" / "b.txt").write_text("delta\n")
    ws.run_json("--until", "download")
    plan = ws.mlcbuild("plan", "toy.yaml").stdout
    assert "input 'source' changed (output of download)" in plan


def test_selection_flags(ws):
    ws.run_json("--device", "cpu", "--quantization", "q0f16")
    assert ws.ran() == ["compile[q0f16,cpu]", "convert_weight[q0f16]", "download", "gen_config[q0f16]",
                        "package[q0f16,cpu]"]
    ws.run_json("--until", "gen_config")
    assert ws.ran() == ["gen_config[q4f16_1]"]
    ws.run_json("--force-stage", "compile", "--device", "cpu")
    assert ws.ran() == ["compile[q0f16,cpu]", "compile[q4f16_1,cpu]", "convert_weight[q4f16_1]", "package[q4f16_1,cpu]"]
    ws.run_json("--force", "--quantization", "q0f16", "--device", "cpu")
    assert ws.ran() == ["compile[q0f16,cpu]", "convert_weight[q0f16]", "download", "gen_config[q0f16]",
                        "package[q0f16,cpu]"]
    proc = ws.mlcbuild("run", "toy.yaml", "--device", "metal", check=False)
    assert proc.returncode == 2 and "--device: 'metal' is not in the recipe" in proc.stderr


def test_failure_stops_dependents_and_keep_going_finishes_the_rest(ws):
    proc = ws.mlcbuild("run", "toy.yaml", "-j", "1", env={"FAKE_COMPILE_FAIL": "cuda:sm_80"}, check=False)
    assert proc.returncode == 1
    assert "compiler exploded for cuda:sm_80" in proc.stderr
    ran = ws.ran()
    assert "package[q0f16,cuda:sm_80]" not in ran and "package[q4f16_1,cuda:sm_80]" not in ran
    events = ws.run_json("--keep-going", env={"FAKE_COMPILE_FAIL": "cuda:sm_80"}, check=False)
    statuses = {e["node"]: e["event"] for e in events if "node" in e and e["event"] not in ("log", "materialized")}
    assert statuses["package[q0f16,cpu]"] in ("node_done", "node_cached")
    assert statuses["package[q4f16_1,cpu]"] in ("node_done", "node_cached")
    assert statuses["package[q0f16,cuda:sm_80]"] == "node_skipped"
    assert (ws.root / "dist/toy/q4f16_1-cpu/lib.so").exists()
    assert not (ws.root / "dist/toy/q4f16_1-cuda-sm_80").exists()


def test_two_processes_share_one_cache_and_build_each_node_once(ws):
    """Two runs of one recipe on one cache at the same time: a node one of them is building, the
    other waits for (``node_waiting``: it found the node's lock held) and then takes as built
    meanwhile; every node is built once. The runs are made to overlap: the first one's compiles
    are held until the second reports that it is waiting for one of them."""
    release = ws.root / "release"
    first = ws.popen("run", "toy.yaml", "--json", "-j", "2", env={"FAKE_STAGE_HOLD": str(release)})
    deadline = time.time() + 60
    while not (ws.log.exists() and "compile[" in ws.log.read_text()):  # the first is inside a compile
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.02)
    second = ws.popen("run", "toy.yaml", "--json", "-j", "2")
    out2 = []
    for line in second.stdout:  # its events, as they come (one flushed line each)
        out2.append(line)
        if json.loads(line)["event"] == "node_waiting":
            break
    release.write_text("")
    out1, err1 = first.communicate(timeout=120)
    rest, err2 = second.communicate(timeout=120)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert ws.ran() == ALL_NODES  # each node exactly once across both processes
    events1 = [json.loads(line) for line in out1.splitlines()]
    events2 = [json.loads(line) for line in out2 + rest.splitlines()]
    waited = [e["node"] for e in events2 if e["event"] == "node_waiting"]
    built_by_first = {e["node"] for e in events1 if e["event"] == "node_done"}
    assert waited and set(waited) <= built_by_first, (waited, built_by_first)
    for node in waited:  # after waiting: the node as the other process built it, not built again
        outcome = [e for e in events2 if e.get("node") == node and e["event"] in ("node_cached", "node_done")]
        assert [(e["event"], e["reason"]) for e in outcome] == [
            ("node_cached", "built meanwhile by another build sharing this cache")]
    keys1 = {e["node"]: e["key"] for e in events1 if e["event"] in ("node_done", "node_cached")}
    keys2 = {e["node"]: e["key"] for e in events2 if e["event"] in ("node_done", "node_cached")}
    assert keys1 == keys2


def test_sigkill_midway_leaves_no_record_and_no_partial_blob(ws):
    flag = ws.root / "paused.flag"
    proc = ws.popen("run", "toy.yaml", "-j", "1", "--device", "cpu", "--quantization", "q0f16",
                    env={"FAKE_STAGE_PAUSE": "compile", "FAKE_STAGE_PAUSED_FLAG": str(flag)})
    deadline = time.time() + 60
    while not flag.exists():
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = {json.loads(p.read_text())["label"] for p in (ws.cache / "records").glob("*/*.json")}
    assert "compile[q0f16,cpu]" not in records
    blob_sizes = {p.stat().st_size for p in (ws.cache / "blobs").glob("*/*")}
    assert 4096 not in blob_sizes  # the half-written output never entered the store
    assert not (ws.root / "dist").exists()
    ws.ran()
    ws.run_json("--device", "cpu", "--quantization", "q0f16")
    assert ws.ran() == ["compile[q0f16,cpu]", "package[q0f16,cpu]"]
    # gc removes the dead process's work dir.
    ws.mlcbuild("cache", "gc", "--older-than", "30d")
    assert list((ws.cache / "tmp").iterdir()) == []


def test_flipped_byte_is_caught_by_verify_and_on_use(ws):
    ws.run_json()
    ws.ran()
    weights = ws.root / "dist/toy/q0f16-cpu/weights/w.bin"
    # Corrupt the blob behind one weight file (the dist file is a hard link to it).
    data = bytearray(weights.read_bytes())
    data[3] ^= 0xFF
    blob = next(p for p in (ws.cache / "blobs").glob("*/*") if p.stat().st_ino == weights.stat().st_ino)
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    proc = ws.mlcbuild("cache", "verify", check=False)
    assert proc.returncode == 1 and f"blob {blob.name}: content does not match its digest" in proc.stdout
    ws.run_json()
    # Every record that used the bad blob (the weights, and the bundles holding them) is rebuilt.
    assert ws.ran() == ["convert_weight[q0f16]", "package[q0f16,cpu]", "package[q0f16,cuda:sm_80]"]
    assert ws.mlcbuild("cache", "verify").returncode == 0
    # On use: corrupt again and run without verify: the read-back check catches it.
    blob = next(p for p in (ws.cache / "blobs").glob("*/*") if p.stat().st_ino == weights.stat().st_ino)
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    ws.run_json("--force-stage", "package")
    ran = ws.ran()
    assert "convert_weight[q0f16]" in ran and "package[q0f16,cpu]" in ran
    assert ws.mlcbuild("cache", "verify").returncode == 0


def test_cache_ls_info_rm_gc_and_dag(ws):
    ws.run_json()
    ls = ws.mlcbuild("cache", "ls", "--json").stdout.splitlines()
    assert len(ls) == len(ALL_NODES)
    first = json.loads(ls[0])
    info = json.loads(ws.mlcbuild("cache", "info", first["key"][:12]).stdout)
    assert info["key"] == first["key"] and info["outputs"]
    ws.mlcbuild("cache", "rm", first["key"])
    assert len(ws.mlcbuild("cache", "ls", "--json").stdout.splitlines()) == len(ALL_NODES) - 1
    assert "evicted" in ws.mlcbuild("cache", "gc", "--max-size", "1B").stdout
    assert ws.mlcbuild("cache", "ls", "--json").stdout.strip() == ""
    mermaid = ws.mlcbuild("dag", "toy.yaml", "--format", "mermaid").stdout
    assert mermaid.startswith("graph LR") and mermaid.count("-->") == 2 + 2 + 2 + 4 + 16
    dot = ws.mlcbuild("dag", "toy.yaml", "--format", "dot").stdout
    assert "digraph" in dot
    text = ws.mlcbuild("dag", "toy.yaml").stdout
    assert "package[q4f16_1,cuda:sm_80]" in text


def test_gc_spares_what_a_running_build_holds(ws):
    ws.run_json()
    flag = ws.root / "paused.flag"
    ws.recipe.write_text(ws.recipe.read_text().replace("[cpu, cuda:sm_80]", "[cpu, cuda:sm_90]"))
    proc = ws.popen("run", "toy.yaml", "-j", "1", env={"FAKE_STAGE_PAUSE": "compile", "FAKE_STAGE_PAUSED_FLAG": str(flag)})
    try:
        deadline = time.time() + 60
        while not flag.exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        ws.mlcbuild("cache", "gc", "--max-size", "1B")
        labels = {json.loads(line)["label"] for line in ws.mlcbuild("cache", "ls", "--json").stdout.splitlines()}
        # The running build holds the nodes it used so far: they survive.
        assert {"download", "gen_config[q0f16]"} <= labels
        assert "package[q0f16,cuda:sm_80]" not in labels
    finally:
        proc.kill()
        proc.wait()
