"""The local backend: nodes of a stage that is not thread-safe build side by side, the first in this
process, the next in builder processes (``pipeline.builder_process``), into the same store, with their
events relayed; and nodes run at once only while the memory they declare fits the budget. In process,
with a stage defined here (it pickles by reference to this module)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from mlcbuild.cache.store import ArtifactStore
from mlcbuild.pipeline.executor import Executor, RunOptions
from mlcbuild.pipeline.graph import Graph, Node
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageError, StageParams
from mlcbuild.toolchain import BUILDER_PROCESS_ENV


class MeetParams(StageParams):
    name: str
    meet: str  # a directory where every node of the run announces itself
    expect: int  # how many nodes must be there at once for this one to finish
    # The first node of the run to start in a builder process fails ("error": raises StageError;
    # "kill": its process is killed), as the one that creates the file ``victim`` says.
    fail: str = ""
    victim: str = ""
    memory: int = 0  # bytes the node declares (Resources.memory_bytes)
    linger: float = 0.0  # seconds to stay running once met


class Meet(Stage):
    """Finishes only once ``expect`` nodes are running at once: nodes built one after the
    other would wait for ever (here: 60 s, then fail)."""

    name = "meet"
    version = "1"
    Params = MeetParams
    thread_safe = False

    def resources(self, params: MeetParams) -> Resources:
        return Resources(memory_bytes=params.memory)

    def preload_modules(self, params: MeetParams) -> list[str]:
        return ["preload_marker"]

    def run(self, ctx: StageContext) -> None:
        started = time.monotonic()
        p = ctx.params
        meet = Path(p.meet)
        in_builder = bool(os.environ.get(BUILDER_PROCESS_ENV))
        ctx.log(f"{p.name} in pid {os.getpid()}")
        if p.fail and in_builder and _claim(Path(p.victim)):
            if p.fail == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise StageError(f"{p.name} refuses")
        (meet / p.name).write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while len(list(meet.iterdir())) < p.expect:
            if time.monotonic() > deadline:
                raise StageError(f"{p.name}: only {sorted(x.name for x in meet.iterdir())} ran beside it")
            time.sleep(0.02)
        time.sleep(p.linger)
        ctx.warn(f"{p.name} met the others")
        (ctx.out / "result").write_text(f"{p.name} pid={os.getpid()} builder={in_builder}\n")
        (meet.parent / f"span-{p.name}").write_text(f"{started} {time.monotonic()}")


def _claim(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


STAGES = {"meet": Meet()}


def _graph(meet: Path, names: list[str], expect: int, fail: str = "", memory: int = 0, linger: float = 0.0) -> Graph:
    g = Graph()
    for name in names:
        params = MeetParams(name=name, meet=str(meet), expect=expect, fail=fail, victim=str(meet.parent / "victim"),
                            memory=memory, linger=linger)
        g.add(Node("meet", params, {}, f"meet[{name}]", {}))
    return g


def _run(cache: Path, graph: Graph, jobs: int, memory: int | None = None) -> tuple[object, list[dict]]:
    events: list[dict] = []
    store = ArtifactStore(cache)
    options = RunOptions(jobs=jobs, local_memory_bytes=memory)
    result = Executor(store, graph, STAGES.__getitem__, options, on_event=events.append).run()
    return result, events


def test_three_non_thread_safe_nodes_build_at_once_in_three_processes(tmp_path):
    meet = tmp_path / "meet"
    meet.mkdir()
    result, events = _run(tmp_path / "cache", _graph(meet, ["a", "b", "c"], expect=3), jobs=3)
    assert result.ok, [s.error for s in result.states]
    pids = {p.read_text() for p in meet.iterdir()}
    assert len(pids) == 3 and str(os.getpid()) in pids  # one here, two in builder processes
    done = [e for e in events if e["event"] == "node_done"]
    assert sorted(e.get("worker", "") for e in done)[1:] == sorted(
        f"builder process {p}" for p in pids if p != str(os.getpid()))
    # a builder's logs and warnings reach the run's events, each under its own node
    for name in "abc":
        logs = [e["message"] for e in events if e["event"] == "log" and e["node"] == f"meet[{name}]"]
        assert len(logs) == 1 and logs[0].startswith(f"{name} in pid")
    store = ArtifactStore(tmp_path / "cache")
    for state in result.states:
        assert store.get_record(state.record.key).warnings == [f"{state.node.params.name} met the others"]
    # the builder processes ended with the run
    for pid in pids - {str(os.getpid())}:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_one_job_builds_them_one_after_the_other_in_this_process(tmp_path):
    meet = tmp_path / "meet"
    meet.mkdir()
    result, _ = _run(tmp_path / "cache", _graph(meet, ["a", "b"], expect=1), jobs=1)
    assert result.ok
    assert {p.read_text() for p in meet.iterdir()} == {str(os.getpid())}


@pytest.mark.parametrize("how", ["error", "kill"])
def test_a_node_failing_in_a_builder_process_fails_alone(tmp_path, how):
    """Four nodes, three at a time: the first to start in a builder process raises, or its process
    is killed; the other three build (the fourth in a fresh process when the victim's died)."""
    meet = tmp_path / "meet"
    meet.mkdir()
    graph = _graph(meet, ["a", "b", "c", "d"], expect=2, fail=how)
    store = ArtifactStore(tmp_path / "cache")
    result = Executor(store, graph, STAGES.__getitem__, RunOptions(jobs=3, keep_going=True)).run()
    failed = [s for s in result.states if s.status == "failed"]
    assert len(failed) == 1 and result.count("built") == 3, [(s.node.label, s.status, s.error) for s in result.states]
    victim = failed[0].node.params.name
    if how == "error":
        assert failed[0].error == f"{victim} refuses"
    else:
        assert "builder process" in failed[0].error and "SIGKILL" in failed[0].error, failed[0].error


def test_nodes_whose_memory_does_not_fit_together_run_one_after_the_other(tmp_path):
    """Budget 10 GiB, nodes of 6 GiB that run 0.5 s each, 3 jobs: never two at once, and the waiting
    ones say why."""
    meet = tmp_path / "meet"
    meet.mkdir()
    result, events = _run(tmp_path / "cache", _graph(meet, ["a", "b", "c"], expect=1, memory=6 << 30, linger=0.5),
                          jobs=3, memory=10 << 30)
    assert result.ok
    spans = sorted(tuple(map(float, (tmp_path / f"span-{n}").read_text().split())) for n in "abc")
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    waits = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("waiting for memory")]
    assert waits and "needs 6.0 GiB, 6.0 of 10.0 GiB held" in waits[0]


def test_nodes_whose_memory_fits_together_run_at_once(tmp_path):
    """Budget 12 GiB: two 6 GiB nodes meet (each finishes only when both run); a node declaring more
    than the whole budget still runs (alone)."""
    meet = tmp_path / "meet"
    meet.mkdir()
    result, _ = _run(tmp_path / "cache", _graph(meet, ["a", "b"], expect=2, memory=6 << 30), jobs=2,
                     memory=12 << 30)
    assert result.ok
    big = tmp_path / "big"
    big.mkdir()
    result, _ = _run(tmp_path / "cache2", _graph(big, ["huge"], expect=1, memory=64 << 30), jobs=2, memory=12 << 30)
    assert result.ok


def test_builder_processes_start_at_the_first_build_and_preload_the_stages_modules(tmp_path, monkeypatch):
    """A source node first, then three meet nodes: the run's first build (the source) starts the two
    builder processes the meet nodes will need, which import the stage's preload module before
    any meet node starts; those two processes then build the two meet nodes not built here."""
    marker = tmp_path / "preloaded"
    monkeypatch.setenv("MLCBUILD_TEST_PRELOAD_MARKER", str(marker))
    meet = tmp_path / "meet"
    meet.mkdir()
    g = Graph()
    gate = g.add(Node("slow", SlowParams(marker=str(marker)), {}, "slow", {}))
    for name in "abc":
        g.add(Node("meet", MeetParams(name=name, meet=str(meet), expect=3), {"after": gate}, f"meet[{name}]", {}))
    events: list[dict] = []
    stages = {"meet": Meet(), "slow": Slow()}
    result = Executor(ArtifactStore(tmp_path / "cache"), g, stages.__getitem__, RunOptions(jobs=3),
                      on_event=events.append).run()
    assert result.ok, [s.error for s in result.states]
    seen_by_slow = (tmp_path / "slow-saw").read_text().split()
    assert len(seen_by_slow) == 2  # both builders had imported the preload module before slow ended
    builders = {e["worker"].rsplit(" ", 1)[1] for e in events if e["event"] == "node_done" and e.get("worker")}
    assert builders == set(seen_by_slow)


class SlowParams(StageParams):
    marker: str


class Slow(Stage):
    """Waits until two pids are in ``marker`` (at most 60 s), then notes which it saw."""

    name = "slow"
    version = "1"
    Params = SlowParams

    def run(self, ctx: StageContext) -> None:
        marker = Path(ctx.params.marker)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_pids(marker)) < 2:
            time.sleep(0.05)
        (marker.parent / "slow-saw").write_text("\n".join(_pids(marker)))
        (ctx.out / "done").write_text("ok")


def _pids(marker: Path) -> list[str]:
    return marker.read_text().split() if marker.exists() else []


def test_a_builder_process_ends_when_its_parent_is_killed_mid_node(tmp_path):
    """A parent process (a run) starts a builder on a node that never finishes, then is SIGKILLed:
    the builder exits within seconds instead of finishing the node for nobody."""
    import subprocess
    import sys

    meet = tmp_path / "meet"
    meet.mkdir()
    script = f"""
import sys, threading
sys.path[:0] = {sys.path!r}
from pathlib import Path
from mlcbuild.cache.store import ArtifactStore
from mlcbuild.pipeline.backend import BuildJob
from mlcbuild.pipeline.builder_process import BuilderProcess
from test_local_backend import Meet, MeetParams
builder = BuilderProcess()
print(builder.pid, flush=True)
params = MeetParams(name="x", meet={str(meet)!r}, expect=2)  # alone: it waits (60 s) for a second node
job = BuildJob(key="k" * 32, label="meet[x]", stage="meet", params=params.model_dump(mode="json"), inputs={{}},
               toolchain={{}})
builder.build(job, Meet(), Path({str(tmp_path / "cache")!r}), lambda kind, fields: None)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        builder_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while not (meet / "x").exists():  # the node is running in the builder
            assert time.monotonic() < deadline and parent.poll() is None
            time.sleep(0.05)
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(builder_pid):
            assert time.monotonic() < deadline, "the builder outlived its parent"
            time.sleep(0.05)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_stage_a_builder_cannot_load_builds_in_this_process(tmp_path):
    """A stage class only this process can import (as one defined in a script's __main__): the
    builder says it cannot load it, nothing is built there, and both nodes build here."""
    import types

    module = types.ModuleType("stages_only_the_parent_has")
    sys_modules = __import__("sys").modules
    sys_modules[module.__name__] = module
    try:
        local = type("LocalMeet", (Meet,), {"__module__": module.__name__})
        module.LocalMeet = local
        meet = tmp_path / "meet"
        meet.mkdir()
        events: list[dict] = []
        graph = Graph()
        for name in "ab":  # each lingers 1 s: while the first runs here, the second is sent to a builder
            graph.add(Node("meet", MeetParams(name=name, meet=str(meet), expect=1, linger=1.0), {}, f"meet[{name}]", {}))
        result = Executor(ArtifactStore(tmp_path / "cache"), graph, {"meet": local()}.__getitem__,
                          RunOptions(jobs=2), on_event=events.append).run()
    finally:
        del sys_modules[module.__name__]
    assert result.ok, [s.error for s in result.states]
    assert {p.read_text() for p in meet.iterdir()} == {str(os.getpid())}
    assert not any(e.get("worker") for e in events if e["event"] == "node_done")
    tried = [e["message"] for e in events if e["event"] == "log" and "cannot load stage" in e["message"]]
    assert len(tried) == 1 and "building in this process" in tried[0]
