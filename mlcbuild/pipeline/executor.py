"""Runs a DAG: cache lookup before run, parallel execution of ready nodes, and events.

A node's key is computed once its inputs are known (built or found in the cache), from the
content digests of those inputs, so a re-run upstream node that produces the same bytes leaves
its dependents cached (early cutoff). Each node that must run is built under a per-key file
lock, in a private work dir, and published atomically; then its outputs are laid out in the
output directory if the template asks for it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import traceback
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

from mlcbuild.cache.store import ArtifactStore, CorruptBlob, NodeRecord
from mlcbuild.pipeline.backend import Backend, BuildJob, CorruptInput, ExpectedNode, LocalBackend
from mlcbuild.pipeline.code_digest import code_closure, code_digest
from mlcbuild.pipeline.graph import Graph, Node
from mlcbuild.pipeline import journal
from mlcbuild.cache.digests import canonical_digest, tree_digest
from mlcbuild.pipeline.journal import Watch
from mlcbuild.pipeline.stage import Stage, StageError

Event = dict[str, Any]


@dataclass(frozen=True)
class RunOptions:
    jobs: int = os.cpu_count() or 1
    keep_going: bool = False
    force: bool = False
    force_stages: frozenset[str] = frozenset()
    output_dir: Path | None = None  # where nodes with ``materialize`` are laid out
    # Memory the local backend lets running nodes declare at once (``Resources.memory_bytes``);
    # None: two thirds of the machine's RAM, as Bazel's --local_ram_resources.
    local_memory_bytes: int | None = None


@dataclass
class NodeState:
    node: Node
    status: str = "pending"  # pending | running | cached | pulled | built | failed | skipped
    key: str | None = None
    record: NodeRecord | None = None
    reason: str = ""
    error: str | None = None
    duration_s: float = 0.0
    retries: int = 0
    worker: str = ""


@dataclass
class PlanEntry:
    node: Node
    action: str  # "cached" | "run" | "after-upstream"
    reason: str
    key: str | None = None


@dataclass
class RunResult:
    states: list[NodeState]
    duration_s: float

    @property
    def ok(self) -> bool:
        return all(s.status in ("cached", "pulled", "built") for s in self.states)

    def count(self, status: str) -> int:
        return sum(1 for s in self.states if s.status == status)


class _CorruptInput(Exception):
    def __init__(self, upstream: Node, cause: CorruptBlob) -> None:
        super().__init__(str(cause))
        self.upstream = upstream


class Executor:
    def __init__(
        self,
        store: ArtifactStore,
        graph: Graph,
        get_stage: Callable[[str], Stage],
        options: RunOptions = RunOptions(),
        on_event: Callable[[Event], None] | None = None,
        backend: Backend | None = None,
        remote: Any = None,
    ) -> None:
        self.store = store
        self.graph = graph
        self.get_stage = get_stage
        self.options = options
        self._on_event = on_event
        self._event_lock = threading.Lock()
        self._stages: dict[str, Stage] = {}
        # A backend made here is closed after each run (its builder processes end with the run).
        self._owns_backend = backend is None
        self.backend = backend or LocalBackend(store, self._stage, builder_processes=max(0, options.jobs - 1),
                                               memory_bytes=options.local_memory_bytes)
        self.remote = remote  # a RemoteCache beneath the local store, or None
        self._read_files: set[Watch] = set()  # what keys were computed from (for the run journal)
        self._warm_lock = threading.Lock()
        self._warmed = False  # the backend was told what this run may build (see _warm_backend)

    # -- keys --------------------------------------------------------------------------------
    def _stage(self, name: str) -> Stage:
        if name not in self._stages:
            self._stages[name] = self.get_stage(name)
        return self._stages[name]

    def components(self, node: Node, inputs: dict[str, NodeRecord], lineage: dict[str, str]) -> dict:
        """Everything that can change ``node``'s output; its key is the digest of this."""
        stage = self._stage(node.stage)
        roots = [Path(path) for path in stage.source_paths(node.params)]
        source_files = [entry for root in roots for entry in self.store.stat_cache.tree(root)]
        code = code_closure(self.store.stat_cache, stage.code_modules(node.params))
        self._note_read(roots, stage.watch_paths(node.params), [file.path for file in code])
        comps = {
            "stage": node.stage,
            "version": stage.version,
            "params": stage.key_params(node.params),
            "inputs": {name: record.tree_digest for name, record in sorted(inputs.items())},
            "toolchain": stage.toolchain(node.params),
            "sources": tree_digest(source_files) if source_files else None,
            "code": code_digest(code),
        }
        if stage.records_lineage:
            comps["lineage"] = lineage
        return {"components": comps, "source_files": [e[:2] for e in source_files],
                "code_files": [[file.relpath, file.digest] for file in code]}

    def _note_read(self, roots: list[Path], watched: list[Path], code: list[Path]) -> None:
        for root in roots:
            self._read_files.update(_tree_watches(root))
        # The stage's code, lazily imported modules included: a cached run never imports them,
        # so the journal's watches of loaded modules would not notice their edit.
        self._read_files.update((str(Path(path).absolute()), journal.FILE) for path in code)
        for path in watched:
            path = Path(path).absolute()
            self._read_files.add((str(path), journal.DIR if path.is_dir() else journal.FILE))

    def read_watches(self) -> list[Watch]:
        """For the run journal: the files the keys were computed from (sources, toolchain files,
        the stages' code)."""
        return sorted(self._read_files)

    def produced_watches(self, result: "RunResult") -> list[Watch]:
        """For the run journal: ``result``'s node records and the outputs it laid out."""
        found: list[Watch] = []
        for state in result.states:
            if state.key:
                found.append((str(self.store.record_path(state.key).absolute()), journal.ENTRY))
            if state.node.materialize and self.options.output_dir is not None:
                for sub in state.node.materialize:
                    found += _tree_watches(self.options.output_dir / sub)
        return found

    @staticmethod
    def key_of(described: dict) -> str:
        return canonical_digest(described["components"])

    def _lineage(self, node: Node, states: dict[int, NodeState]) -> dict[str, str]:
        if not self._stage(node.stage).records_lineage:
            return {}
        return {a.label: states[id(a)].key or "" for a in self.graph.ancestors(node)}

    def _forced(self, node: Node) -> bool:
        return self.options.force or node.stage in self.options.force_stages

    # -- plan ----------------------------------------------------------------------------------
    def plan(self) -> list[PlanEntry]:
        """What ``run`` would do for each node, and why (like ``dvc status``)."""
        entries: list[PlanEntry] = []
        known: dict[int, NodeRecord | None] = {}
        states: dict[int, NodeState] = {id(n): NodeState(n) for n in self.graph.nodes}
        for node in self.graph.nodes:
            waiting = [up for up in node.inputs.values() if known.get(id(up)) is None]
            if waiting:
                names = ", ".join(sorted({up.label for up in waiting}))
                entries.append(PlanEntry(node, "after-upstream", f"checked after {names} runs"))
                known[id(node)] = None
                continue
            inputs = {name: known[id(up)] for name, up in node.inputs.items()}
            described = self.components(node, inputs, self._lineage(node, states))  # type: ignore[arg-type]
            key = self.key_of(described)
            states[id(node)].key = key
            record = self.store.get_record(key)
            if self._forced(node):
                entries.append(PlanEntry(node, "run", "forced", key))
                known[id(node)] = None
            elif record is not None:
                entries.append(PlanEntry(node, "cached", "up to date", key))
                known[id(node)] = record
            else:
                reason = explain(self.store.read_index(node.slot), described, self._labels(node))
                entries.append(PlanEntry(node, "run", reason, key))
                known[id(node)] = None
        return entries

    @staticmethod
    def _labels(node: Node) -> dict[str, str]:
        return {name: up.label for name, up in node.inputs.items()}

    # -- explicit sync with the remote cache (`cache push` / `cache pull`) ----------------------
    def sync(self, direction: str) -> dict[str, int]:
        """Push every node of the graph that the local cache holds to the remote cache, or pull
        every node the remote holds that the local cache lacks ("push" | "pull"); nothing is built.
        A node's key needs its inputs' records, so a node whose input is in neither cache is
        skipped with its dependents. Returns counts by outcome."""
        if self.remote is None:
            raise ValueError("no remote cache: give --remote-cache URL or set MLCBUILD_REMOTE_CACHE")
        counts = {"pushed": 0, "pulled": 0, "present": 0, "missing": 0}
        known: dict[int, NodeRecord | None] = {}
        states: dict[int, NodeState] = {id(n): NodeState(n) for n in self.graph.nodes}
        for node in self.graph.nodes:
            state = states[id(node)]
            if any(known.get(id(up)) is None for up in node.inputs.values()):
                known[id(node)] = None
                counts["missing"] += 1
                state.reason = "an input is in neither cache"
                self._emit("node_skipped", state)
                continue
            inputs = {name: known[id(up)] for name, up in node.inputs.items()}
            described = self.components(node, inputs, self._lineage(node, states))  # type: ignore[arg-type]
            state.key = self.key_of(described)
            record = self.store.get_record(state.key)
            if direction == "push":
                if record is not None:
                    self._push(state, record)
                    counts["pushed"] += 1
                else:
                    state.reason = "not in the local cache"
                    self._emit("node_skipped", state)
                    counts["missing"] += 1
            elif record is None:
                record = self._pull(state, state.key)
                counts["pulled" if record is not None else "missing"] += 1
            else:
                counts["present"] += 1
            if self.remote is None:
                raise ConnectionError("the remote cache became unavailable; nothing more was transferred")
            known[id(node)] = record
        return counts

    # -- run -----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            if self._owns_backend:
                self.backend.close()

    def _run(self) -> RunResult:
        started = time.perf_counter()
        states = {id(n): NodeState(n) for n in self.graph.nodes}
        stop = False
        with self.store.session() as session, ThreadPoolExecutor(max(1, self.options.jobs)) as pool:
            futures: dict[Future, NodeState] = {}
            while True:
                if not stop:
                    for state in states.values():
                        if state.status != "pending":
                            continue
                        ups = [states[id(u)] for u in state.node.inputs.values()]
                        if any(u.status in ("failed", "skipped") for u in ups):
                            state.status = "skipped"
                            bad = next(u for u in ups if u.status in ("failed", "skipped"))
                            state.reason = f"upstream {bad.node.label} {bad.status}"
                            self._emit("node_skipped", state)
                        elif all(u.status in ("cached", "pulled", "built") for u in ups):
                            state.status = "running"
                            # The inputs' records as of now: a corrupt-input retry may reset an
                            # upstream while a sibling dependent is still starting.
                            inputs = {name: states[id(u)].record for name, u in state.node.inputs.items()}
                            futures[pool.submit(self._process, state, states, inputs, session)] = state
                if not futures:
                    break
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for future in done:
                    state = futures.pop(future)
                    try:
                        state.status = future.result()
                    except _CorruptInput as exc:
                        # The upstream's blob went bad after it was recorded: rebuild it, then us.
                        upstream = states[id(exc.upstream)]
                        self._emit("blob_corrupt", upstream, message=str(exc))
                        state.retries += 1
                        if state.retries > 3:
                            state.status, state.error = "failed", str(exc)
                            self._emit("node_failed", state, error=state.error)
                        else:
                            if upstream.status in ("cached", "pulled", "built"):  # not already being redone
                                upstream.status, upstream.record = "pending", None
                            state.status = "pending"
                    except Exception as exc:  # noqa: BLE001 - any stage failure is reported
                        state.status = "failed"
                        state.error = _describe_failure(exc)
                        self._emit("node_failed", state, error=state.error)
                        if not self.options.keep_going:
                            stop = True
            if stop:
                for state in states.values():
                    if state.status == "pending":
                        state.status, state.reason = "skipped", "build stopped after a failure"
                        self._emit("node_skipped", state)
        result = RunResult(list(states.values()), time.perf_counter() - started)
        self._emit_raw({"event": "run_done", "ok": result.ok, "duration_s": round(result.duration_s, 4),
                        **{s: result.count(s) for s in ("built", "pulled", "cached", "failed", "skipped")}})
        return result

    def _process(self, state: NodeState, states: dict[int, NodeState], inputs: dict[str, NodeRecord],
                 session: Any) -> str:
        """Find, pull or build one node from its ``inputs``' records; returns its outcome ("cached",
        "pulled" or "built"). Only the main loop changes ``state.status``, so dependents are
        scheduled only once this returns."""
        node = state.node
        described = self.components(node, inputs, self._lineage(node, states))  # type: ignore[arg-type]
        key = state.key = self.key_of(described)
        session.hold(key)
        forced = self._forced(node)
        outcome = "cached"
        record = None if forced else self.store.get_record(key)
        local = True
        if record is None:
            previous = self.store.read_index(node.slot)
            state.reason = "forced" if forced else explain(previous, described, self._labels(node))
            with self.store.lock(key, on_wait=lambda: self._emit("node_waiting", state)):
                record = None if forced else self.store.get_record(key)
                if record is not None:
                    state.reason = "built meanwhile by another build sharing this cache"
                else:
                    record = None if forced else self._pull(state, key)
                    outcome = "pulled"
                    if record is None:
                        self._warm_backend(states)
                        record, local = self._build(state, inputs, described)  # type: ignore[arg-type]
                        outcome = "built"
        if outcome == "cached":
            state.reason = state.reason or "up to date"
            self.store.touch(key)
            self._emit("node_cached", state)
        if outcome != "built":  # what its build warned about still holds for what is reused
            for message in record.warnings:
                self._emit("warning", state, message=message, recorded=True)
        state.record = record
        previous = self.store.read_index(node.slot)
        if previous is None or previous.get("key") != key:
            self.store.write_index(node.slot, {"key": key, **described})
        if node.materialize and self.options.output_dir is not None and not local:
            # Built on another machine: its outputs reach this one through the remote cache.
            if self.store.get_record(key) is None and self._pull(state, key) is None:
                raise StageError(f"{node.label} was built on {state.worker or 'a worker'} but its outputs could "
                                 f"not be fetched here: give every worker the same --cache-dir or a --remote-cache")
        self._materialize_outputs(state)
        return outcome

    # -- the remote cache ------------------------------------------------------------------
    def _pull(self, state: NodeState, key: str) -> NodeRecord | None:
        """The node's record and blobs from the remote cache, published into the local store;
        None on a miss, when there is no readable remote, or when it failed (then rebuilt)."""
        remote = self.remote
        if remote is None or not remote.can_read:
            return None
        from mlcbuild.cache.remote import RemoteCorrupt, RemoteUnavailable

        started = time.perf_counter()
        record, pulling = None, False
        try:
            if remote.has(key):  # a cheap existence check first: a miss draws no progress bar
                pulling = True
                self._emit("node_pulling", state)
                record = remote.pull(key, self.store, progress=lambda done, total: self._emit(
                    "progress", state, done=done, total=total))
        except RemoteUnavailable as exc:
            self._remote_failed(exc)
        except RemoteCorrupt as exc:
            self._emit("remote_corrupt", state, message=f"{exc}; building it here instead")
        if record is None:
            if pulling:
                self._emit("node_pull_failed", state)
            return None
        state.duration_s = time.perf_counter() - started
        self._emit("node_pulled", state, bytes=record.size, duration_s=round(state.duration_s, 3))
        return record

    def _push(self, state: NodeState, record: NodeRecord) -> None:
        remote = self.remote
        if remote is None or not remote.can_write:
            return
        from mlcbuild.cache.remote import RemoteUnavailable

        started = time.perf_counter()
        self._emit("node_pushing", state)
        try:
            sent = remote.push(record, self.store, progress=lambda done, total: self._emit(
                "progress", state, done=done, total=total))
        except RemoteUnavailable as exc:
            self._emit("node_push_failed", state)
            self._remote_failed(exc)
            return
        except CorruptBlob as exc:  # never spread a bad local blob: the next run rebuilds the node
            self.store.drop_record(record.key)
            self._emit("node_push_failed", state)
            self._emit("blob_corrupt", state, message=f"{exc}; not pushed")
            return
        self._emit("node_pushed", state, bytes=sent, duration_s=round(time.perf_counter() - started, 3))

    def _remote_failed(self, exc: Exception) -> None:
        """The remote went away: say so once, and build locally for the rest of the run."""
        with self._event_lock:
            if self.remote is None:
                return
            url, self.remote = self.remote.url, None
        self._emit_raw({"event": "remote_unavailable", "url": url,
                        "message": f"remote cache {url} is unavailable ({exc}); building locally for the rest of this run"})

    # -- building --------------------------------------------------------------------------
    def _warm_backend(self, states: dict[int, NodeState]) -> None:
        """At the run's first build: tell the backend which nodes may follow (every node not yet
        found, pulled or built), so that it can ready its workers while this one builds. A no-op
        run never gets here, so it starts nothing."""
        with self._warm_lock:
            if self._warmed:
                return
            self._warmed = True
            expected = []
            for state in states.values():
                if state.status not in ("pending", "running"):
                    continue
                try:
                    resources = self._stage(state.node.stage).resources(state.node.params)
                except Exception:  # noqa: BLE001 - a head start only: that node's own build reports it
                    continue
                expected.append(ExpectedNode(state.node.stage, state.node.params.model_dump(mode="json"), resources))
        self.backend.warm(expected)

    def _build(self, state: NodeState, inputs: dict[str, NodeRecord], described: dict) -> tuple[NodeRecord, bool]:
        """Build one node through the backend; returns its record and whether it is in the local store."""
        node = state.node
        stage = self._stage(node.stage)
        components = described["components"]
        job = BuildJob(key=state.key or "", label=node.label, stage=node.stage,
                       params=node.params.model_dump(mode="json"), inputs=inputs,
                       toolchain=components["toolchain"], lineage=components.get("lineage", {}),
                       resources=stage.resources(node.params), code=components.get("code") or "")
        self._emit("node_start", state, reason=state.reason)
        started = time.perf_counter()
        try:
            outcome = self.backend.build(job, lambda kind, extra: self._emit(kind, state, **extra))
        except CorruptInput as exc:
            raise _CorruptInput(node.inputs[exc.input_name], exc.cause) from None
        state.worker = outcome.worker
        record = outcome.record
        state.duration_s = record.duration_s if outcome.local else time.perf_counter() - started
        extra: dict = {"worker": outcome.worker} if outcome.worker else {}
        if outcome.phases:
            extra["phases"] = outcome.phases
        self._emit("node_done", state, bytes=record.size, duration_s=round(state.duration_s, 3), **extra)
        if outcome.local:
            self._push(state, record)
        return record, outcome.local

    def _materialize_outputs(self, state: NodeState) -> None:
        if not state.node.materialize or self.options.output_dir is None or state.record is None:
            return
        for sub in state.node.materialize:
            dest = self.options.output_dir / sub
            dest.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(dest.parent / f".{dest.name}.lock")):
                if self.store.is_materialized(state.record, dest):
                    continue
                staging = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
                try:
                    self.store.materialize(state.record, staging)
                except CorruptBlob as exc:
                    shutil.rmtree(staging, ignore_errors=True)
                    self.store.drop_record(state.record.key)
                    raise _CorruptInput(state.node, exc) from None
                # Swap in the complete directory; never leave a half-written one at ``dest``.
                if dest.exists():
                    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
                    os.rename(dest, old)
                    os.rename(staging, dest)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(staging, dest)
                self._emit("materialized", state, path=str(dest))

    # -- events ----------------------------------------------------------------------------
    @staticmethod
    def _event(kind: str, state: NodeState, **extra: Any) -> Event:
        event = {"event": kind, "node": state.node.label, "stage": state.node.stage}
        if state.key:
            event["key"] = state.key
        if state.reason and kind in ("node_start", "node_cached", "node_skipped"):
            event["reason"] = state.reason
        event.update(extra)
        return event

    def _emit(self, kind: str, state: NodeState, **extra: Any) -> None:
        self._emit_raw(self._event(kind, state, **extra))

    def rerun_events(self, result: RunResult) -> list[Event]:
        """The events a rerun emits that finds every node of the successful ``result`` cached (what
        the run journal replays), in graph order."""
        return [self._event("node_cached", replace(state, reason="up to date")) for state in result.states]

    def _emit_raw(self, event: Event) -> None:
        if self._on_event is not None:
            with self._event_lock:
                self._on_event(event)


def _tree_watches(root: Path) -> list[Watch]:
    """The run journal's watches of a file, or of a directory tree in one walk: every directory
    (an entry added or removed) and every file."""
    root = Path(root).absolute()
    if not root.is_dir():
        return [(str(root), journal.FILE)]
    found: list[Watch] = [(str(root), journal.DIR)]
    for dirpath, dirnames, filenames in os.walk(root):
        found += [(os.path.join(dirpath, name), journal.DIR) for name in dirnames]
        found += [(os.path.join(dirpath, name), journal.FILE) for name in filenames]
    return found


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, StageError):
        return str(exc)
    return "".join(traceback.format_exception_only(type(exc), exc)).strip() + "\n" + "".join(
        traceback.format_tb(exc.__traceback__)[-3:]
    )


def explain(previous: dict | None, described: dict, input_labels: dict[str, str]) -> str:
    """Why a node must run, comparing its components with its last build."""
    if previous is None:
        return "new: never built"
    old, new = previous["components"], described["components"]
    reasons = []
    if old.get("version") != new["version"]:
        reasons.append(f"stage version changed ({old.get('version')} -> {new['version']})")
    changed = _diff(old.get("params", {}), new["params"])
    if changed:
        reasons.append("params changed: " + ", ".join(changed))
    changed = _diff(old.get("toolchain", {}), new["toolchain"])
    if changed:
        reasons.append("toolchain changed: " + ", ".join(changed))
    for name, digest in new["inputs"].items():
        if old.get("inputs", {}).get(name) != digest:
            reasons.append(f"input '{name}' changed (output of {input_labels.get(name, name)})")

    def changed_files(listed: str) -> str:
        before = {p: d for p, d in previous.get(listed, [])}
        after = {p: d for p, d in described.get(listed, [])}
        files = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
        return ", ".join(files[:5]) + (f" (+{len(files) - 5} more)" if len(files) > 5 else "")

    if old.get("sources") != new["sources"]:
        reasons.append(f"source files changed: {changed_files('source_files')}")
    if "code" not in old:
        reasons.append("its key now covers the stage's code (last built before it did)")
    elif old["code"] != new.get("code"):
        reasons.append(f"code changed: {changed_files('code_files')}")
    if old.get("lineage") != new.get("lineage") and not reasons:
        reasons.append("an upstream node was rebuilt")
    return "; ".join(reasons) or "not in the cache (evicted or never published)"


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(_diff(a, b, f"{prefix}{name}."))
        elif a != b:
            out.append(f"{prefix}{name}: {a!r} -> {b!r}")
    return out
