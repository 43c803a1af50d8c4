"""Where a node is built: the executor decides *what* runs, a backend decides *where*.

A ``BuildJob`` carries everything needed to build one node anywhere (the stage's name, its
params as JSON, the records of its inputs, its key and toolchain facts, the resources its stage
declares); ``build_node`` builds it into an artifact store. Backends never know what a stage
does: the local backend calls ``build_node`` on a thread of this process (or in a builder process
of its own, for a stage that cannot share the process: ``pipeline.builder_process``), the Ray backend
(``mlcbuild.pipeline.ray_backend``) in a task on a cluster worker.
"""

from __future__ import annotations

import os
import pickle
import shutil
import threading
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from mlcbuild.cache.store import ArtifactStore, CorruptBlob, NodeRecord
from mlcbuild.pipeline.builder_process import BuilderPool, StageNotLoadable
from mlcbuild.pipeline.stage import Resources, Stage, StageContext

# (event kind, extra fields) -> None: a backend's way to report a node's log lines, progress and
# warnings; the executor adds the node's label, stage and key.
Emit = Callable[[str, dict[str, Any]], None]


class CorruptInput(Exception):
    """An input's blob went bad after it was recorded: the executor rebuilds that input."""

    def __init__(self, input_name: str, cause: CorruptBlob) -> None:
        super().__init__(str(cause))
        self.input_name = input_name
        self.cause = cause

    def __reduce__(self) -> tuple:  # it crosses from a builder process (builder_process.py)
        return (type(self), (self.input_name, self.cause))


@dataclass
class BuildJob:
    """One node to build, in plain data (picklable: it travels to cluster workers)."""

    key: str
    label: str
    stage: str
    params: dict[str, Any]  # the stage's params as JSON; validated again where the job runs
    inputs: dict[str, NodeRecord]
    toolchain: dict[str, str]
    lineage: dict[str, str] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    code: str = ""  # digest of the stage's code the key was computed with (a worker checks its own)


@dataclass(frozen=True)
class ExpectedNode:
    """A node this run may still build (for :meth:`Backend.warm`): its stage, params and needs."""

    stage: str
    params: dict[str, Any]
    resources: Resources


@dataclass
class BuildOutcome:
    record: NodeRecord
    worker: str = ""  # where it ran, for the events ("" for this process)
    # True when the record is in the executor's own store (the backend built into it); False when
    # it lives elsewhere (a worker's store and the remote cache) and must be pulled to be laid out.
    local: bool = True
    # Where a remote backend's wall time per node went, in seconds ("dispatch_s", "inputs_s",
    # "checks_s", "publish_s", "push_s", "return_s"; "warm_up_s": what warming the worker process
    # took before it got its first node, not part of this node's wall): reported in node_done.
    phases: dict[str, float] = field(default_factory=dict)


def build_node(job: BuildJob, store: ArtifactStore, stage: Stage, emit: Emit,
               exclusive: threading.Lock | None = None) -> NodeRecord:
    """Build ``job`` in a private work dir of ``store`` and publish it there.

    ``exclusive``: held while a stage that is not thread-safe runs."""
    params = stage.Params.model_validate(job.params)
    work = store.new_workdir(job.label)
    try:
        input_dirs: dict[str, Path] = {}
        for name, record in job.inputs.items():
            target = work / "in" / name
            target.mkdir(parents=True)
            try:
                store.materialize(record, target)
            except CorruptBlob as exc:
                store.drop_record(record.key)
                raise CorruptInput(name, exc) from None
            input_dirs[name] = target
        out = work / "out"
        out.mkdir()
        (work / "scratch").mkdir()
        ctx = StageContext(
            params=params,
            inputs=input_dirs,
            out=out,
            work=work / "scratch",
            toolchain=job.toolchain,
            key=job.key,
            lineage=job.lineage,
            log=lambda message: emit("log", {"message": message}),
            progress=lambda done, total: emit("progress", {"done": done, "total": total}),
            on_warning=lambda message: emit("warning", {"message": message}),
        )
        started = time.perf_counter()
        if stage.thread_safe or exclusive is None:
            stage.run(ctx)
        else:
            with exclusive:
                started = time.perf_counter()  # time the work, not the wait
                stage.run(ctx)
        duration = time.perf_counter() - started
        return store.publish(
            job.key,
            out,
            {
                "label": job.label,
                "stage": job.stage,
                "version": stage.version,
                "params": job.params,
                "inputs": {name: record.tree_digest for name, record in sorted(job.inputs.items())},
                "toolchain": job.toolchain,
                "duration_s": round(duration, 3),
                "warnings": ctx.warnings,
            },
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def default_memory_budget() -> int:
    """Two thirds of this machine's physical RAM (Bazel's default for local actions)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 2 // 3
    except (ValueError, OSError):
        return 1 << 62  # not knowable here: no limit


class MemoryBudget:
    """Memory that running nodes declare, held while they run: a node waits until its amount fits
    beside those running (one asking more than the whole budget waits until nothing else runs)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.held = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, amount: int, emit: Emit | None = None) -> Iterator[None]:
        amount = max(0, min(amount, self.total))
        with self._changed:
            if self.held and self.held + amount > self.total and emit is not None:
                emit("log", {"message": f"waiting for memory: needs {amount / 2**30:.1f} GiB, "
                                        f"{self.held / 2**30:.1f} of {self.total / 2**30:.1f} GiB held by running nodes"})
            while self.held and self.held + amount > self.total:
                self._changed.wait()
            self.held += amount
        try:
            yield
        finally:
            with self._changed:
                self.held -= amount
                self._changed.notify_all()


class Backend(ABC):
    """Runs build jobs somewhere. ``build`` blocks until the node is built (the executor calls it
    from one of its threads per running node) and raises the stage's exception on failure."""

    name: str = ""

    @abstractmethod
    def build(self, job: BuildJob, emit: Emit) -> BuildOutcome: ...

    def warm(self, expected: list[ExpectedNode]) -> None:
        """The run is about to build: get ready for ``expected`` without waiting (a backend whose
        workers start cold, as fresh processes, may start and prepare them now, beside the first
        nodes, as Bazel's persistent workers are). Default: nothing to do."""

    def close(self) -> None:
        """Release what the backend holds (cluster connections)."""


class LocalBackend(Backend):
    """Builds on a thread of this process, into the executor's own store.

    A stage that is not thread-safe runs on this process's thread when no other such node is
    running here; while one is, the next ones go to up to ``builder_processes`` builder
    processes (``pipeline.builder_process``) instead of waiting, so a fan-out over devices and
    quantizations compiles on every core. With 0 they wait their turn.

    Nodes run at once only while the memory their stages declare (``Resources.memory_bytes``)
    fits in ``memory_bytes`` (default: two thirds of the machine's RAM, as Bazel's
    ``--local_ram_resources``); a node declaring more than that runs alone."""

    name = "local"

    def __init__(self, store: ArtifactStore, get_stage: Callable[[str], Stage], builder_processes: int = 0,
                 memory_bytes: int | None = None) -> None:
        self.store = store
        self.get_stage = get_stage
        self._exclusive = threading.Lock()  # held while a non-thread-safe stage runs in this process
        self._builders = BuilderPool(builder_processes)
        self._picklable: dict[str, bool] = {}
        self._memory = MemoryBudget(memory_bytes if memory_bytes is not None else default_memory_budget())

    def build(self, job: BuildJob, emit: Emit) -> BuildOutcome:
        with self._memory.hold(job.resources.memory_bytes, emit):
            return self._build(job, emit)

    def _build(self, job: BuildJob, emit: Emit) -> BuildOutcome:
        stage = self.get_stage(job.stage)
        if stage.thread_safe:
            return BuildOutcome(build_node(job, self.store, stage, emit))
        if self._exclusive.acquire(blocking=False):
            try:
                return BuildOutcome(build_node(job, self.store, stage, emit))
            finally:
                self._exclusive.release()
        builder = self._builders.take() if self._can_send(job.stage, stage) else None
        if builder is not None:
            try:
                return BuildOutcome(builder.build(job, stage, self.store.root, emit),
                                    worker=f"builder process {builder.pid}")
            except StageNotLoadable as exc:  # nothing was built there: this stage builds here from now on
                self._picklable[job.stage] = False
                emit("log", {"message": f"{exc}; building in this process"})
            finally:
                self._builders.give_back(builder)
        # every builder busy (or none allowed, or it could not load the stage): wait for this process's turn
        return BuildOutcome(build_node(job, self.store, stage, emit, self._exclusive))

    def warm(self, expected: list[ExpectedNode]) -> None:
        """With two or more nodes to come of stages that cannot share this process, start the
        builder processes the second and later will use, importing what those stages preload
        (TVM, for compiles), beside the run's first nodes."""
        modules: list[str] = []
        count = 0
        for node in expected:
            try:
                stage = self.get_stage(node.stage)
                if stage.thread_safe or not self._can_send(node.stage, stage):
                    continue
                params = stage.Params.model_validate(node.params)
                modules += [*stage.code_modules(params), *stage.preload_modules(params)]
            except Exception:  # noqa: BLE001 - a head start only: the node's own build reports it
                continue
            count += 1
        if count > 1:
            self._builders.prestart(count - 1, list(dict.fromkeys(modules)))

    def _can_send(self, name: str, stage: Stage) -> bool:
        """Whether ``stage`` pickles (one holding a live object does not) and, once tried, a builder
        could load it (one whose class lives in this process's ``__main__`` cannot): a stage that
        cannot go to a builder waits for this process instead."""
        if name not in self._picklable:
            try:
                pickle.dumps(stage)
                self._picklable[name] = True
            except Exception:  # noqa: BLE001 - any pickling failure means "keep it here"
                self._picklable[name] = False
        return self._picklable[name]

    def close(self) -> None:
        self._builders.close()
