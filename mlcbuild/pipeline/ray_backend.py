"""Builds nodes on a Ray cluster: each node that must run becomes one Ray task.

Use::

    mlcbuild run recipes/*.yaml --executor ray                      # a Ray instance started here
    mlcbuild run recipes/*.yaml --executor ray --ray-address HEAD:6379 --remote-cache s3://bucket/mlcbuild

or, from Python, ``Executor(store, graph, get_stage, options, on_event, backend=RayBackend(address,
store, remote_url, remote_mode, stage_plugins), remote=RemoteCache.from_url(remote_url, remote_mode))``
and ``backend.close()`` when the run is over. ``address`` None starts a local Ray instance in this
process; otherwise it is the address of a running cluster's head (``ray start --head``). The
executor still decides *what* runs (keys, cache lookups, pulls); this backend decides only *where*.

Placement. A task asks for what the node's stage declares (``Stage.resources``): CPUs, a memory
estimate and custom resources naming a toolchain, e.g. ``{"nvcc": 1}`` for a CUDA compile, so a
heterogeneous cluster routes it to a worker started with ``ray start ... --resources='{"nvcc": 1}'``.
A node that no node of the cluster could ever take fails at once with what to start, instead of
waiting forever (this assumes a cluster of fixed size, not an autoscaling one). A local instance
(``address`` None) is this machine alone: custom resources are not asked for there, as the local
backend does not ask either.

Artifacts never travel through Ray's object store (weights are gigabytes): a task gets the node's
input *records* (small JSON) and returns the output record; the bytes move through caches.

- A worker that sees the driver's cache directory (the same path, checked with a random token
  file the driver writes there, so a same-named directory on another disk is not taken for it)
  builds straight into it. A worker whose node was started with ``$MLCBUILD_CACHE_DIR`` set uses
  that directory instead (a local disk per machine), shared with the driver only if the token is
  there.
- Any other worker uses its own cache directory and the remote cache (``--remote-cache``, in
  ``read-write`` mode): it pulls the inputs it lacks by key, builds, and pushes the result, which
  the driver then pulls where it must lay a bundle out. Without a remote such a worker fails the
  node with a message saying ``--remote-cache`` is needed.

Before building, a worker recomputes the stage's toolchain facts and refuses the node when they
differ from those its key was computed with on the driver (another compiler version, another host
CPU for a host-specific target): the key must describe what was built.

Failures. A worker process or node that dies mid-node is a system failure: Ray runs the task
again (``max_retries``) and the run goes on. An exception raised by the stage is deterministic: it
is not retried, and the driver raises the stage's own exception (a ``StageError`` stays one, with
its message).

Events. The stage's log lines and progress reach the driver's ``emit`` through a small actor the
task reports to and the driver polls, so ``--json`` events and progress bars look as in a local
run; ``BuildOutcome.worker`` names the worker (host, IP, pid, Ray node) for the ``node_done`` event.

Workers import ``mlcbuild`` (install it on every node, same version: the key covers the driver's
code, see the toolchain check above) and get the driver's ``$PYTHONPATH`` and
``$MLCBUILD_STAGE_PLUGINS``, so plugin stages import there too. A worker's process title while it
builds is ``ray::mlcbuild.build:<node label>``.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import ray.exceptions

from mlcbuild.cache.store import ArtifactStore, CorruptBlob, NodeRecord
from mlcbuild.pipeline.backend import Backend, BuildJob, BuildOutcome, CorruptInput, Emit, ExpectedNode, build_node
from mlcbuild.pipeline.stage import Stage, StageError
from mlcbuild.toolchain import BUILDER_PROCESS_ENV

TASK_NAME_PREFIX = "mlcbuild.build"  # a building worker's process title: ray::mlcbuild.build:<label>
MAX_RETRIES = 3  # runs of a task after its worker died (system failures only)
EVENT_POLL_S = 0.5  # how often the driver collects a running node's events
EVENT_FLUSH_S = 0.5  # how often a task sends its buffered events
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # a local instance: only records and events go through it
TOKEN_FILE = "token"  # in the driver's cache dir: a worker that reads the same token shares that dir
# Warm-up (see RayBackend.warm): worker processes readied per placement class (nodes asking for the
# same custom resources), and the share of each custom resource a warm-up task asks for (enough to
# be placed where the class's nodes will run, too little to keep one of them waiting).
WARM_PROCESSES_PER_CLASS = 2
WARM_RESOURCE_SHARE = 0.001


class ClusterError(StageError):
    """The Ray cluster could not be reached, or cannot run a node (no worker has what it needs):
    the message says what to start or fix."""


@dataclass(frozen=True)
class _Driver:
    """What every task needs to know about the driver (plain data: sent with each task)."""

    cache_root: str
    token_dir: str  # the directory under cache_root/tmp holding the token file
    token: str
    remote_url: str | None
    remote_mode: str
    get_stage: str  # "module:function" resolving a stage name to a Stage on the worker


class RayBackend(Backend):
    """Runs build jobs as Ray tasks. See the module docstring for how artifacts and failures move."""

    name = "ray"

    def __init__(
        self,
        address: str | None,
        store: ArtifactStore,
        remote_url: str | None,
        remote_mode: str = "read-write",
        stage_plugins: str | None = None,
        *,
        get_stage: str = "mlcbuild.stages:get_stage",
        max_retries: int = MAX_RETRIES,
    ) -> None:
        self.store = store
        # A local instance is this machine, which has whatever toolchain it has, as for the
        # local backend: custom resources (which machine has a toolchain) place nodes on a cluster only.
        self._local = address is None
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            try:
                if address is None:
                    # "local": a new instance even where a cluster started by `ray start` runs.
                    ray.init(address="local", include_dashboard=False, log_to_driver=False,
                             object_store_memory=LOCAL_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
                else:
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray instance"
                raise ClusterError(f"--ray-address: could not connect to {where}: {exc}") from exc
        # A stage's stdout would interleave with --json events (log_to_driver=False): stages
        # report through ctx.log, which reaches the driver as events.
        env_vars = {name: value for name, value in (("MLCBUILD_STAGE_PLUGINS", stage_plugins),
                                                    ("PYTHONPATH", os.environ.get("PYTHONPATH"))) if value}
        self._runtime_env = {"env_vars": env_vars} if env_vars else None
        token = secrets.token_hex(16)
        # A directory named like a work dir of this process: `cache gc` removes it once this
        # process is gone, should close() never run.
        self._token_dir = store.new_workdir("ray-driver-token")
        (self._token_dir / TOKEN_FILE).write_text(token)
        self._driver = _Driver(str(store.root.absolute()), self._token_dir.name, token, remote_url, remote_mode,
                               get_stage)
        self._max_retries = max_retries
        self._relay: Any = None
        self._relay_lock = threading.Lock()
        self._relay_broken = False
        self._nodes: tuple[float, list[dict]] = (0.0, [])
        self._warming: list[Any] = []
        self._to_warm: list[ExpectedNode] | None = None  # told by warm(), started after the next dispatch
        self._warm_lock = threading.Lock()

    # -- building ----------------------------------------------------------------------------
    def build(self, job: BuildJob, emit: Emit) -> BuildOutcome:
        resources = job.resources
        options: dict[str, Any] = {
            "name": f"{TASK_NAME_PREFIX}:{job.label}",
            "num_cpus": resources.cpus,
            "resources": {} if self._local else dict(resources.custom),
            "max_retries": self._max_retries,
            "retry_exceptions": False,  # a stage's exception is deterministic: fail once
        }
        if resources.memory_bytes:
            options["memory"] = resources.memory_bytes
        if self._runtime_env:
            options["runtime_env"] = self._runtime_env
        self._check_placeable(job, options)
        build_id = secrets.token_hex(8)
        relay = self._event_relay()
        submitted = time.time()  # wall clock: compared with the worker's (one host, or NTP-close hosts)
        ref = _build_task.options(**options).remote(job, self._driver, build_id, relay)
        self._start_warm_ups()  # after this node's task: it is the one the run waits for now
        while True:
            ready, _ = ray.wait([ref], timeout=EVENT_POLL_S)
            self._forward_events(relay, build_id, emit)
            if ready:
                break
        try:
            result = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            raise _stage_exception(exc) from None
        except ray.exceptions.WorkerCrashedError as exc:
            raise StageError(f"{job.label}: its Ray worker died {self._max_retries + 1} times ({exc})") from None
        # The task's last flush was synchronous: what it reported is in the relay by now.
        self._forward_events(relay, build_id, emit)
        if "corrupt_input" in result:
            cause = CorruptBlob(result["digest"], "reported by a worker")
            cause.args = (result["message"],)
            raise CorruptInput(result["corrupt_input"], cause)
        record = NodeRecord.model_validate_json(result["record"])
        clock = result["clock"]
        phases = {"dispatch_s": clock["started"] - submitted, "inputs_s": clock["inputs_s"],
                  "checks_s": clock["checks_s"], "publish_s": clock["build_s"] - record.duration_s,
                  "push_s": clock["push_s"], "return_s": time.time() - clock["ended"]}
        if clock.get("warm_up_s"):
            phases["warm_up_s"] = clock["warm_up_s"]
        return BuildOutcome(record, worker=result["worker"], local=result["shared"],
                            phases={name: round(max(value, 0.0), 3) for name, value in phases.items()})

    def warm(self, expected: list[ExpectedNode]) -> None:
        """Start worker processes and ready them for the nodes to come, without waiting for them.

        A Ray worker is a fresh Python process: before its first node it imports the stage's code
        (for a compile, TVM: seconds on a small machine, more beside other builds) and, on a
        machine with its own cache directory, computes the toolchain facts and code digests the
        node's checks compare (memoized there afterwards). Done at the first node's dispatch it
        adds all that to that node's wall; done here, at the run's first build, it overlaps the
        nodes that must finish first (download, conversion), as Bazel's persistent workers keep a
        compiler loaded. Per placement class (same custom resources: the same machines) up to
        ``WARM_PROCESSES_PER_CLASS`` tasks run at once, so as many processes are readied; Ray then
        reuses an idle worker process of the job for the next task (the warmed ones). A warm-up
        asks for no CPU and a sliver of each custom resource, so it never holds a node back; one
        that fails is ignored (the node's own task reports what is wrong). The warm-ups are
        submitted right after the task of the node being dispatched, so they never get ahead of it."""
        with self._warm_lock:
            self._to_warm = list(expected)

    def _start_warm_ups(self) -> None:
        with self._warm_lock:
            expected, self._to_warm = self._to_warm, None
        if not expected:
            return
        classes: dict[tuple, list[ExpectedNode]] = {}
        for node in expected:
            custom = () if self._local else tuple(sorted(node.resources.custom.items()))
            group = classes.setdefault(custom, [])
            if all((n.stage, n.params) != (node.stage, node.params) for n in group):
                group.append(node)
        for custom, group in classes.items():
            wanted = {name: WARM_RESOURCE_SHARE for name, _ in custom}
            if not any(_fits(node, wanted) for node in self._alive_nodes()):
                continue  # no machine can take these nodes: build() says what to start
            # every process readies every stage of its class (which process gets which node is Ray's)
            work = [(n.stage, n.params) for n in group]
            options: dict[str, Any] = {"name": f"{TASK_NAME_PREFIX}:warm-up", "num_cpus": 0, "resources": wanted,
                                       "max_retries": 0}
            if self._runtime_env:
                options["runtime_env"] = self._runtime_env
            for _ in range(min(WARM_PROCESSES_PER_CLASS, len(group))):
                self._warming.append(_warm_up_task.options(**options).remote(work, self._driver))

    def close(self) -> None:
        for ref in self._warming:  # a run that ended early leaves nothing busy on the cluster
            try:
                ray.cancel(ref)
            except Exception:  # noqa: BLE001 - finished or gone: nothing to stop
                pass
        self._warming = []
        with self._relay_lock:
            relay, self._relay = self._relay, None
        if relay is not None and ray.is_initialized():
            try:
                ray.kill(relay)
            except ray.exceptions.RayError:
                pass
        shutil.rmtree(self._token_dir, ignore_errors=True)
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # -- placement ---------------------------------------------------------------------------
    def _check_placeable(self, job: BuildJob, options: dict[str, Any]) -> None:
        """Fail now, naming what is missing, when no live node of the cluster could ever run the
        task (Ray would keep an infeasible task pending forever)."""
        wanted = {"CPU": float(options["num_cpus"]), **{k: float(v) for k, v in options["resources"].items()}}
        if "memory" in options:
            wanted["memory"] = float(options["memory"])
        wanted = {name: amount for name, amount in wanted.items() if amount > 0}
        if any(_fits(node, wanted) for node in self._alive_nodes()):
            return
        if any(_fits(node, wanted) for node in self._alive_nodes(refresh=True)):
            return
        have = "; ".join(_describe(n["Resources"]) for n in self._alive_nodes()) or "none alive"
        need = _describe(wanted)
        custom = options["resources"]
        hint = (f"; start a worker that has it: ray start --address=... --resources='"
                f"{{{', '.join(f'{chr(34)}{k}{chr(34)}: {v:g}' for k, v in custom.items())}}}'") if custom else ""
        raise ClusterError(f"{job.label} needs {need}, which no node of the Ray cluster has (nodes: {have}){hint}")

    def _alive_nodes(self, refresh: bool = False) -> list[dict]:
        fetched, nodes = self._nodes
        if refresh or time.monotonic() - fetched > 10.0:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            self._nodes = (time.monotonic(), nodes)
        return nodes

    # -- events ------------------------------------------------------------------------------
    def _event_relay(self) -> Any:
        with self._relay_lock:
            if self._relay is None:
                options: dict[str, Any] = {"num_cpus": 0}
                try:  # beside the driver: its polls stay on this machine
                    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                    options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(
                        ray.get_runtime_context().get_node_id(), soft=True)
                except Exception:  # noqa: BLE001 - placement is an optimisation only
                    pass
                self._relay = _EventRelay.options(**options).remote()
            return self._relay

    def _forward_events(self, relay: Any, build_id: str, emit: Emit) -> None:
        if self._relay_broken:
            return
        try:
            events = ray.get(relay.take.remote(build_id))
        except ray.exceptions.RayError as exc:
            # Events are reports, not results: losing them must not fail the build.
            self._relay_broken = True
            emit("warning", {"message": f"events of Ray workers are no longer relayed ({exc})"})
            return
        for kind, extra in events:
            emit(kind, extra)


def _describe(resources: dict[str, float]) -> str:
    shown = []
    for name, amount in sorted(resources.items()):
        if name.startswith("node:") or name == "object_store_memory":
            continue
        shown.append(f"{name}={amount / 2**30:.1f} GiB" if name == "memory" else f"{name}={amount:g}")
    return ", ".join(shown)


def _fits(node: dict, wanted: dict[str, float]) -> bool:
    total = node.get("Resources", {})
    return all(total.get(name, 0.0) >= amount for name, amount in wanted.items())


def _stage_exception(exc: ray.exceptions.RayTaskError) -> BaseException:
    """The exception the stage raised on the worker (its class and message), not Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    if not isinstance(cause, BaseException) or isinstance(cause, ray.exceptions.RayError):
        return StageError(str(exc))
    if not isinstance(cause, StageError):
        # Where it happened (a StageError's message says all a user needs).
        tail = "\n".join(str(getattr(exc, "traceback_str", "")).strip().splitlines()[-6:])
        cause.add_note(f"raised on a Ray worker (pid {getattr(exc, 'pid', '?')}, {getattr(exc, 'ip', '?')}):\n{tail}")
    return cause


# -- on the worker ---------------------------------------------------------------------------------
@ray.remote
class _EventRelay:
    """Holds the events of running tasks until the driver takes them (one per backend)."""

    def __init__(self) -> None:
        self._events: dict[str, list] = {}

    def put(self, build_id: str, events: list) -> None:
        self._events.setdefault(build_id, []).extend(events)

    def take(self, build_id: str) -> list:
        return self._events.pop(build_id, [])


class _TaskEvents:
    """The task's ``emit``: buffers events (consecutive progress reports coalesce) and sends them
    to the relay at most every EVENT_FLUSH_S, without waiting; ``close`` sends the rest and waits."""

    def __init__(self, relay: Any, build_id: str) -> None:
        self.relay, self.build_id = relay, build_id
        self.buffer: list[tuple[str, dict]] = []
        self.sent = time.monotonic()
        self.lock = threading.Lock()

    def emit(self, kind: str, extra: dict[str, Any]) -> None:
        with self.lock:
            if kind == "progress" and self.buffer and self.buffer[-1][0] == "progress":
                self.buffer[-1] = (kind, extra)
            else:
                self.buffer.append((kind, extra))
            if time.monotonic() - self.sent >= EVENT_FLUSH_S:
                self._send(wait=False)

    def close(self) -> None:
        with self.lock:
            self._send(wait=True)

    def _send(self, wait: bool) -> None:
        batch, self.buffer = self.buffer, []
        self.sent = time.monotonic()
        if not batch and not wait:
            return
        try:
            ref = self.relay.put.remote(self.build_id, batch)
            if wait:
                ray.get(ref)
        except ray.exceptions.RayError:
            pass  # reports only


_identity: str | None = None


def _worker_identity() -> str:
    global _identity
    if _identity is None:
        context = ray.get_runtime_context()
        node_ip = ray.util.get_node_ip_address()
        _identity = f"{socket.gethostname()} ({node_ip}) pid {os.getpid()}, ray node {context.get_node_id()[:12]}"
    return _identity


def _worker_store(driver: _Driver) -> tuple[ArtifactStore, bool]:
    """The store this worker builds into, and whether it is the driver's own (shared)."""

    def has_token(root: Path) -> bool:
        try:
            return (root / "tmp" / driver.token_dir / TOKEN_FILE).read_text() == driver.token
        except OSError:
            return False

    own = os.environ.get("MLCBUILD_CACHE_DIR")
    candidate = Path(own) if own else Path(driver.cache_root)
    if has_token(candidate):
        return ArtifactStore(candidate), True
    # Not the driver's: never create its path here (it may be a mount point that is missing).
    from mlcbuild.cache.location import default_cache_dir

    return ArtifactStore(default_cache_dir()), False


def _stage_resolver(spec: str) -> Callable[[str], Stage]:
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _ensure_inputs(job: BuildJob, store: ArtifactStore, open_remote: Callable[[], Any], worker: str) -> None:
    """Make every blob of the job's input records present in ``store``, pulling by key (an input
    built on a worker with its own cache reaches even the driver's cache this way).
    ``open_remote``: the remote cache, or None (opened only when an input is missing)."""
    for name, record in sorted(job.inputs.items()):
        if all(store.blob_path(output.digest).exists() for output in record.outputs):
            continue
        where = f"the cache of worker {worker}"
        remote = open_remote()
        if remote is None:
            raise StageError(
                f"{job.label}: its input '{name}' ({record.label}, key {record.key}) is not in {where} and there is "
                "no remote cache to pull it from: pass --remote-cache URL (or give every worker the same cache directory)")
        pulled = remote.pull(record.key, store)
        if pulled is None:
            raise StageError(
                f"{job.label}: its input '{name}' ({record.label}, key {record.key}) is neither in {where} nor on "
                f"the remote cache {remote.url}; the driver pushes what it builds only to a remote it may write "
                "(--remote-cache-mode read-write)")
        if pulled.tree_digest != record.tree_digest:
            raise StageError(
                f"{job.label}: the remote cache {remote.url} holds other outputs for input '{name}' ({record.label}, "
                f"key {record.key}) than the driver's record: that node does not build reproducibly")


def _stage_checks(driver: _Driver, store: ArtifactStore, name: str, params_json: dict[str, Any],
                  with_code: bool) -> tuple[Stage, Any, dict[str, str], str]:
    """Stage ``name`` as this worker has it, with ``params_json`` validated, its toolchain facts here, and the
    digest of its code here ("" without ``with_code``): what a node's task compares with the facts and code
    digest its key was computed with on the driver (and what a warm-up computes ahead, memoized)."""
    stage = _stage_resolver(driver.get_stage)(name)
    params = stage.Params.model_validate(params_json)
    facts = stage.toolchain(params)
    code = ""
    if with_code:
        from mlcbuild.pipeline.code_digest import code_closure, code_digest

        code = code_digest(code_closure(store.stat_cache, stage.code_modules(params)))
    return stage, params, facts, code


_warm_up_s = 0.0  # what RayBackend.warm spent readying this process, until its first node takes it


# (Ray pickles a remote function by value, with a copy of its module's globals: the tasks share the
# process's state through these plain functions, which pickle by reference to the real module.)
def _add_warm_up(seconds: float) -> None:
    global _warm_up_s
    _warm_up_s += seconds


def _take_warm_up() -> float:
    global _warm_up_s
    taken, _warm_up_s = _warm_up_s, 0.0
    return taken


@ray.remote
def _warm_up_task(work: list[tuple[str, dict[str, Any]]], driver: _Driver) -> float:
    """Ready this worker process for nodes of these stages (see ``RayBackend.warm``): import each
    stage's code and what it preloads (``Stage.preload_modules``), and compute what its node's checks
    will (toolchain facts, code digest: memoized in this machine's cache)."""
    started = time.perf_counter()
    os.environ[BUILDER_PROCESS_ENV] = "1"  # as _build_task: the host probes import here
    try:
        store, _ = _worker_store(driver)
    except Exception:  # noqa: BLE001 - a head start only: the nodes' own tasks report the problem
        work = []
    for name, params_json in work:
        try:
            stage, params, _, _ = _stage_checks(driver, store, name, params_json, with_code=True)
            for module in [*stage.code_modules(params), *stage.preload_modules(params)]:
                importlib.import_module(module)
        except Exception:  # noqa: BLE001 - as above, and the other stages are still readied
            pass
    seconds = time.perf_counter() - started
    _add_warm_up(seconds)
    return seconds


@ray.remote
def _build_task(job: BuildJob, driver: _Driver, build_id: str, relay: Any) -> dict[str, Any]:
    """Build ``job`` on this worker; returns its record (JSON) and where it was built."""
    clock = {"started": time.time(), "inputs_s": 0.0, "checks_s": 0.0, "build_s": 0.0, "push_s": 0.0,
             "warm_up_s": _take_warm_up()}
    # This process builds: the stages' host probes may import what they ask about (mlcbuild.toolchain)
    # instead of starting a child Python per question.
    os.environ[BUILDER_PROCESS_ENV] = "1"
    worker = _worker_identity()
    events = _TaskEvents(relay, build_id)
    try:
        store, shared = _worker_store(driver)
        remote = None
        if shared:
            def open_remote() -> Any:  # inputs only (the driver pushes what is built into its cache)
                if not driver.remote_url or driver.remote_mode == "write":
                    return None
                from mlcbuild.cache.remote import RemoteCache

                return RemoteCache.from_url(driver.remote_url, "read")
        else:
            if not driver.remote_url:
                raise StageError(
                    f"{job.label}: worker {worker} does not see the driver's cache directory {driver.cache_root}, "
                    "so artifacts must travel through a remote cache: pass --remote-cache URL (or give every "
                    "worker the same cache directory)")
            if driver.remote_mode != "read-write":
                raise StageError(
                    f"{job.label}: worker {worker} does not see the driver's cache directory, so it exchanges "
                    f"artifacts through the remote cache {driver.remote_url}, which needs --remote-cache-mode "
                    f"read-write (it is {driver.remote_mode!r})")
            from mlcbuild.cache.remote import RemoteCache

            remote = RemoteCache.from_url(driver.remote_url, "read-write")

            def open_remote() -> Any:
                return remote
        mark = time.perf_counter()
        _ensure_inputs(job, store, open_remote, worker)
        clock["inputs_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        stage, _, facts, here = _stage_checks(driver, store, job.stage, job.params, with_code=bool(job.code))
        if facts != job.toolchain:
            differ = ", ".join(f"{name}: driver {job.toolchain.get(name)!r}, worker {facts.get(name)!r}"
                               for name in sorted(facts.keys() | job.toolchain.keys())
                               if facts.get(name) != job.toolchain.get(name))
            raise StageError(
                f"{job.label}: worker {worker} has other toolchain facts than the node's key was computed with "
                f"on the driver ({differ}); give the workers the driver's toolchain, or make what differs a "
                "param of the recipe")
        if job.code and here != job.code:
            raise StageError(
                f"{job.label}: worker {worker} has other code for stage {job.stage!r} than the driver computed "
                f"the node's key with (code digest {here[:12]}, driver {job.code[:12]}): install the driver's "
                "mlcbuild on every worker, or its artifacts would be cached under keys that do not describe them")
        clock["checks_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        try:
            record = build_node(job, store, stage, events.emit)
        except CorruptInput as exc:  # its cause does not pickle: send what the driver rebuilds it from
            return {"corrupt_input": exc.input_name, "digest": exc.cause.digest, "message": str(exc.cause)}
        clock["build_s"] = time.perf_counter() - mark
        if not shared:  # the driver and the other workers get it from the remote
            mark = time.perf_counter()
            sent = remote.push(record, store)
            clock["push_s"] = time.perf_counter() - mark
            events.emit("node_pushed", {"bytes": sent, "duration_s": round(clock["push_s"], 3), "worker": worker})
    finally:
        events.close()
    clock["ended"] = time.time()
    return {"record": record.model_dump_json(), "worker": worker, "shared": shared, "clock": clock}
