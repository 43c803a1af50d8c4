"""The executor tells its backend, once, at the run's first build, which nodes may follow
(``Backend.warm``: the Ray backend readies worker processes with it), and never on a run that
builds nothing. In process, with two stages defined here and a backend that records the calls."""

from __future__ import annotations

from pathlib import Path

from mlcbuild.cache.store import ArtifactStore
from mlcbuild.pipeline.backend import Backend, BuildJob, BuildOutcome, Emit, ExpectedNode, LocalBackend
from mlcbuild.pipeline.executor import Executor, RunOptions
from mlcbuild.pipeline.graph import Graph, Node
from mlcbuild.pipeline.stage import Resources, Stage, StageContext, StageParams


class TextParams(StageParams):
    text: str


class Write(Stage):
    name = "write"
    version = "1"
    Params = TextParams

    def run(self, ctx: StageContext) -> None:
        (ctx.out / "text").write_text(ctx.params.text)


class Shout(Stage):
    name = "shout"
    version = "1"
    Params = TextParams

    def resources(self, params: TextParams) -> Resources:
        return Resources(cpus=2, custom={"megaphone": 1})

    def run(self, ctx: StageContext) -> None:
        (ctx.out / "text").write_text((ctx.inputs["src"] / "text").read_text().upper() + ctx.params.text)


STAGES = {"write": Write(), "shout": Shout()}


class RecordingBackend(Backend):
    """Builds locally; records what ``warm`` was told and which builds had started by then."""

    name = "recording"

    def __init__(self, store: ArtifactStore) -> None:
        self.local = LocalBackend(store, STAGES.__getitem__)
        self.warmed: list[list[ExpectedNode]] = []
        self.built: list[str] = []
        self.built_when_warmed: list[int] = []

    def warm(self, expected: list[ExpectedNode]) -> None:
        self.warmed.append(expected)
        self.built_when_warmed.append(len(self.built))

    def build(self, job: BuildJob, emit: Emit) -> BuildOutcome:
        self.built.append(job.label)
        return self.local.build(job, emit)


def graph() -> Graph:
    g = Graph()
    hello = g.add(Node("write", TextParams(text="hello"), {}, "write[hello]", {}))
    g.add(Node("write", TextParams(text="bye"), {}, "write[bye]", {}))
    g.add(Node("shout", TextParams(text="!"), {"src": hello}, "shout[hello]", {}))
    return g


def run(cache: Path) -> RecordingBackend:
    store = ArtifactStore(cache)
    backend = RecordingBackend(store)
    result = Executor(store, graph(), STAGES.__getitem__, RunOptions(jobs=1), backend=backend).run()
    assert result.ok
    return backend


def test_the_backend_hears_of_every_node_to_come_once_at_the_first_build(tmp_path):
    backend = run(tmp_path / "cache")
    assert len(backend.warmed) == 1 and backend.built_when_warmed == [0]  # before the first build started
    expected = sorted((n.stage, n.params["text"], n.resources.cpus, tuple(n.resources.custom)) for n in backend.warmed[0])
    assert expected == [("shout", "!", 2, ("megaphone",)), ("write", "bye", 1.0, ()), ("write", "hello", 1.0, ())]
    assert sorted(backend.built) == ["shout[hello]", "write[bye]", "write[hello]"]


def test_a_run_that_builds_nothing_warms_nothing(tmp_path):
    run(tmp_path / "cache")
    again = run(tmp_path / "cache")
    assert again.built == [] and again.warmed == []
