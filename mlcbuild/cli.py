"""The `mlcbuild` command line: the only place that parses argv and prints for humans."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlcbuild.cache.store import ArtifactStore
from mlcbuild.pipeline.executor import Event, Executor, RunOptions
from mlcbuild.pipeline.graph import Graph
from mlcbuild.recipe import LoadedRecipe, RecipeError, load_recipe

app = typer.Typer(help="Build LLM checkpoints into compiled, deployable bundles, and run them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
cache_app = typer.Typer(help="Inspect and maintain the artifact cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
eval_app = typer.Typer(help="Measure a model's quality.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

EXIT_BUILD_FAILED = 1
EXIT_USAGE = 2

CacheDir = typer.Option(None, "--cache-dir", help="Artifact cache (default: $MLCBUILD_CACHE_DIR or the user cache dir).")


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def _load(recipe: Path) -> LoadedRecipe:
    try:
        return load_recipe(recipe)
    except RecipeError as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(EXIT_USAGE) from None


def _graph(loaded: LoadedRecipe, devices: list[str] | None = None, quantizations: list[str] | None = None,
           until: str | None = None) -> Graph:
    from mlcbuild.stages import LLM_TEMPLATE, build_graph

    stages = [t.stage for t in LLM_TEMPLATE]
    if until is not None and until not in stages:
        _fail(f"--until: {until!r} is not a stage; stages: {', '.join(stages)}")
    for flag, wanted, known in (("--device", devices, loaded.recipe.devices),
                                ("--quantization", quantizations, loaded.recipe.quantization)):
        for value in wanted or []:
            if value not in known:
                _fail(f"{flag}: {value!r} is not in the recipe; it has: {', '.join(known)}")
    try:
        graph = build_graph(loaded)
    except (RecipeError, ValueError) as exc:
        _fail(str(exc))
    filters = {"device": set(devices or []), "quantization": set(quantizations or [])}

    def keep(node: Any) -> bool:
        if until is not None and node.stage != until:
            return False
        return all(not wanted or node.axes.get(axis) in wanted or axis not in node.axes
                   for axis, wanted in filters.items())

    selected = graph.select(keep)
    _preflight(selected)
    return selected


def _preflight(graph: Graph) -> None:
    """Fail before any work when this machine cannot build a node (a stage's ``preflight`` names
    what is missing: a device's compiler, SDK or TVM code generator)."""
    from mlcbuild.stages import stage_class

    problems: list[str] = []
    for node in graph.nodes:
        check = getattr(stage_class(node.stage), "preflight", None)
        for problem in check(node.params) if check is not None else []:
            if problem not in problems:
                problems.append(problem)
    if problems:
        _fail("this machine cannot build what was asked (nothing was built):\n  " + "\n  ".join(problems)
              + "\n`mlcbuild doctor` lists every device and what it needs; --device builds a subset")


def _executor(graph: Graph, cache_dir: Path | None, options: RunOptions, on_event: Any = None,
              remote: Any = None, backend: Any = None) -> Executor:
    from mlcbuild.stages import get_stage

    store = ArtifactStore(cache_dir)
    if callable(backend):
        backend = backend(store)
    return Executor(store, graph, get_stage, options, on_event, backend=backend, remote=remote)


RemoteCacheOption = typer.Option(
    None, "--remote-cache", envvar="MLCBUILD_REMOTE_CACHE",
    help="Shared cache beneath the local one: file:///path, s3://bucket/prefix, gs://bucket/prefix, "
         "or http(s)://host/prefix (Bazel HTTP cache protocol).")
RemoteModeOption = typer.Option(
    "read-write", "--remote-cache-mode", envvar="MLCBUILD_REMOTE_CACHE_MODE",
    help="read-write | read (e.g. CI for pull requests from forks) | write.")


def _remote(url: str | None, mode: str) -> Any:
    if not url:
        return None
    from mlcbuild.cache.remote import RemoteCache

    try:
        return RemoteCache.from_url(url, mode)
    except ValueError as exc:
        _fail(f"--remote-cache: {exc}")


class _HumanProgress:
    """Rich progress for a build: a spinner per running node, one line per finished node. The
    progress display starts with the first node that runs (a no-op rerun, all cached, neither
    imports nor draws it: it is the most frequent command and should cost milliseconds)."""

    def __init__(self, quiet: bool = False) -> None:
        self._progress: Any = None
        self._lock = threading.Lock()
        self.tasks: dict[str, Any] = {}
        self.quiet = quiet  # only what builds, is pulled or fails (the build-first step of chat/serve)

    @property
    def progress(self) -> Any:
        with self._lock:
            if self._progress is None:
                from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

                self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                          DownloadColumn(), TimeElapsedColumn(), console=console, transient=True)
                self._progress.start()
            return self._progress

    def __enter__(self) -> "_HumanProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def __call__(self, event: Event) -> None:
        kind, node = event["event"], event.get("node", "")
        if kind == "node_start":
            console.print(f"[cyan]build [/cyan] {escape(node)}  [dim]({escape(event.get('reason', ''))})[/dim]")
            self.tasks[node] = self.progress.add_task(escape(node), total=None)
        elif kind == "progress" and node in self.tasks:
            self.progress.update(self.tasks[node], completed=event["done"], total=event.get("total"))
        elif kind == "log":
            self.progress.console.print(f"[dim]{escape(node)}: {escape(str(event['message']))}[/dim]")
        elif kind == "warning":
            self.progress.console.print(f"[yellow]warning[/yellow] {escape(node)}: {escape(str(event['message']))}")
        elif kind == "node_done":
            self._finish(node)
            where = f", on {event['worker']}" if event.get("worker") else ""
            console.print(f"[green]done  [/green] {escape(node)}  [dim]{event['duration_s']:.2f}s, "
                          f"{_size(event.get('bytes', 0))}{escape(where)}[/dim]")
        elif kind == "node_cached" and not self.quiet:
            console.print(f"[dim]cached {escape(node)}[/dim]")
        elif kind == "node_pulling":
            self.tasks[node] = self.progress.add_task(escape(f"pull {node}"), total=None)
        elif kind in ("node_pull_failed", "node_push_failed"):
            self._finish(node)
        elif kind == "node_pulled":
            self._finish(node)
            console.print(f"[blue]pulled[/blue] {escape(node)}  [dim]{event['duration_s']:.2f}s, "
                          f"{_size(event.get('bytes', 0))}[/dim]")
        elif kind == "node_pushing":
            self.tasks[node] = self.progress.add_task(escape(f"push {node}"), total=None)
        elif kind == "node_pushed":
            self._finish(node)
            console.print(f"[dim]pushed {escape(node)} ({_size(event.get('bytes', 0))} uploaded)[/dim]")
        elif kind in ("remote_unavailable", "remote_corrupt"):
            console.print(f"[yellow]warning[/yellow] {escape(node + ': ' if node else '')}{escape(event['message'])}")
        elif kind == "node_failed":
            self._finish(node)
            console.print(f"[red]FAILED[/red] {escape(node)}\n{escape(event['error'])}")
        elif kind == "node_skipped":
            console.print(f"[yellow]skip  [/yellow] {escape(node)}  [dim]({escape(event.get('reason', ''))})[/dim]")
        elif kind == "blob_corrupt":
            console.print(f"[yellow]corrupt[/yellow] {escape(node)}: {escape(event['message'])}")
        elif kind == "materialized" and not self.quiet:
            console.print(f"[dim]wrote  {escape(event['path'])}[/dim]")

    def _finish(self, node: str) -> None:
        task = self.tasks.pop(node, None)
        if task is not None:
            self.progress.remove_task(task)


def _update_journal(recipe: Path, loaded: LoadedRecipe, executor: Executor, result: Any) -> None:
    """A run of the whole recipe that succeeded records the run journal, so that the next
    identical run is answered by ``stat`` alone (``mlcbuild.launcher``); a failed one drops it."""
    from mlcbuild.pipeline import journal
    from mlcbuild.sources.lock import lock_path

    ident = journal.run_identity(recipe, executor.store.root)
    path = journal.journal_path(executor.store.root, ident)
    if not result.ok:
        journal.discard(path)
        return
    recipe_files = [(str(loaded.path.absolute()), journal.FILE), (str(lock_path(loaded.path).absolute()), journal.FILE)]
    output_dir = str(loaded.output_dir) if any(n.materialize for n in executor.graph.nodes) else None
    journal.write(path, ident, recipe_files + executor.read_watches() + journal.python_watches(),
                  executor.produced_watches(result), {"events": executor.rerun_events(result), "output_dir": output_dir})


def _json_event(event: Event) -> None:
    print(json.dumps(event, sort_keys=True), flush=True)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@app.command()
def run(
    recipes: list[Path] = typer.Argument(..., help="Recipe YAML file(s): several make one DAG, shared nodes built once."),
    jobs: Optional[int] = typer.Option(None, "-j", "--jobs", min=1,
                                       help="Nodes to run at once (default: the CPU count; 64 with --executor ray)."),
    keep_going: bool = typer.Option(False, "--keep-going", "-k", help="After a failure, finish the independent nodes."),
    device: Optional[list[str]] = typer.Option(None, "--device", help="Only this device (repeatable)."),
    quantization: Optional[list[str]] = typer.Option(None, "--quantization", "-q", help="Only this quantization (repeatable)."),
    until: Optional[str] = typer.Option(None, "--until", help="Stop after this stage."),
    force: bool = typer.Option(False, "--force", help="Rebuild every selected node."),
    force_stage: Optional[list[str]] = typer.Option(None, "--force-stage", help="Rebuild the nodes of this stage (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON event per line on stdout (for CI)."),
    cache_dir: Optional[Path] = CacheDir,
    remote_cache: Optional[str] = RemoteCacheOption,
    remote_mode: str = RemoteModeOption,
    executor_name: str = typer.Option("local", "--executor", help="local (threads of this process) | ray (a Ray cluster)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Ray cluster to use (default: start one here)."),
    quiet: bool = typer.Option(False, "--quiet", help="Print only what is built, pulled or fails (nothing when all is cached)."),
) -> None:
    """Build recipes: reuse every cached node, pull what the remote cache has, build the rest, lay bundles out."""
    loaded_all = [_load(recipe) for recipe in recipes]
    graph = Graph()
    for loaded in loaded_all:
        graph.merge(_graph(loaded, device, quantization, until))
    if executor_name not in ("local", "ray"):
        _fail(f"--executor: {executor_name!r} is not an executor; expected local or ray")
    remote = _remote(remote_cache, remote_mode)
    backend = _LazyRayBackend(ray_address, remote_cache, remote_mode) if executor_name == "ray" else None
    options = RunOptions(jobs=jobs or (64 if backend else os.cpu_count() or 1), keep_going=keep_going, force=force,
                         force_stages=frozenset(force_stage or []),
                         output_dir=Path.cwd())  # each node's materialize paths are absolute: its recipe's output dir
    try:
        if as_json:
            executor = _executor(graph, cache_dir, options, _json_event, remote, backend)
            result = executor.run()
        else:
            with _HumanProgress(quiet) as human:
                executor = _executor(graph, cache_dir, options, human, remote, backend)
                result = executor.run()
    finally:
        if backend is not None and backend.instance is not None:
            backend.instance.close()
    if len(recipes) == 1 and not (device or quantization or until or force or force_stage or remote_cache
                                  or executor_name != "local"):
        _update_journal(recipes[0], loaded_all[0], executor, result)
    if not as_json and not (quiet and result.ok and not result.count("built") and not result.count("pulled")):
        pulled = f"{result.count('pulled')} pulled, " if result.count("pulled") else ""
        summary = (f"{result.count('built')} built, {pulled}{result.count('cached')} cached, "
                   f"{result.count('failed')} failed, {result.count('skipped')} skipped "
                   f"in {result.duration_s:.2f}s")
        console.print(("[green]ok[/green] " if result.ok else "[red]failed[/red] ") + summary)
        if result.ok and any(n.materialize for n in graph.nodes):
            for loaded in loaded_all:
                console.print(f"outputs in {loaded.output_dir}")
    if not result.ok:
        raise typer.Exit(EXIT_BUILD_FAILED)


class _LazyRayBackend:
    """Makes the Ray backend once the store is open (it needs the store's directory)."""

    def __init__(self, address: str | None, remote_url: str | None, remote_mode: str) -> None:
        self.address, self.remote_url, self.remote_mode = address, remote_url, remote_mode
        self.instance: Any = None

    def __call__(self, store: ArtifactStore) -> Any:
        try:
            from mlcbuild.pipeline.ray_backend import RayBackend
        except ImportError as exc:
            _fail(f"--executor ray needs Ray: pip install 'mlcbuild[distributed]' ({exc})")
        self.instance = RayBackend(self.address, store, self.remote_url, self.remote_mode,
                                   os.environ.get("MLCBUILD_STAGE_PLUGINS"))
        return self.instance


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    device: Optional[list[str]] = typer.Option(None, "--device"),
    quantization: Optional[list[str]] = typer.Option(None, "--quantization", "-q"),
    until: Optional[str] = typer.Option(None, "--until"),
    force: bool = typer.Option(False, "--force"),
    force_stage: Optional[list[str]] = typer.Option(None, "--force-stage"),
    as_json: bool = typer.Option(False, "--json"),
    cache_dir: Optional[Path] = CacheDir,
) -> None:
    """Show what `run` would do for each node, and why (which input, param or tool changed)."""
    loaded = _load(recipe)
    graph = _graph(loaded, device, quantization, until)
    options = RunOptions(force=force, force_stages=frozenset(force_stage or []))
    entries = _executor(graph, cache_dir, options).plan()
    if as_json:
        for e in entries:
            _json_event({"node": e.node.label, "stage": e.node.stage, "action": e.action,
                         "reason": e.reason, "key": e.key})
        return
    style = {"cached": "dim", "run": "cyan", "after-upstream": "yellow"}
    for e in entries:
        out.print(f"[{style[e.action]}]{e.action:<14}[/{style[e.action]}] {escape(f'{e.node.label:<36}')} {escape(e.reason)}")
    todo = sum(1 for e in entries if e.action != "cached")
    out.print(f"{todo} of {len(entries)} nodes to run" if todo else "everything is up to date")


@app.command()
def dag(
    recipe: Path = typer.Argument(..., help="Recipe YAML file."),
    fmt: str = typer.Option("text", "--format", help="text | mermaid | dot"),
) -> None:
    """Print the recipe's DAG of stages."""
    loaded = _load(recipe)
    graph = _graph(loaded)
    ids = {id(n): f"n{i}" for i, n in enumerate(graph.nodes)}
    if fmt == "mermaid":
        out.print("graph LR", markup=False)
        for n in graph.nodes:
            out.print(f'  {ids[id(n)]}["{n.label}"]', markup=False)
        for n in graph.nodes:
            for name, up in n.inputs.items():
                out.print(f"  {ids[id(up)]} -->|{name}| {ids[id(n)]}", markup=False)
    elif fmt == "dot":
        out.print("digraph mlcbuild {\n  rankdir=LR;", markup=False)
        for n in graph.nodes:
            out.print(f'  {ids[id(n)]} [label="{n.label}"];', markup=False)
        for n in graph.nodes:
            for name, up in n.inputs.items():
                out.print(f'  {ids[id(up)]} -> {ids[id(n)]} [label="{name}"];', markup=False)
        out.print("}", markup=False)
    elif fmt == "text":
        sinks = [n for n in graph.nodes if not graph.dependents(n)]
        from rich.tree import Tree

        root = Tree(f"[bold]{loaded.recipe.name}[/bold]")

        def add(tree: Tree, node: Any) -> None:
            for name, up in node.inputs.items():
                add(tree.add(f"{escape(up.label)} [dim]({name})[/dim]"), up)

        for sink in sinks:
            add(root.add(escape(sink.label) + (f" [dim]-> {escape(', '.join(sink.materialize))}[/dim]" if sink.materialize else "")), sink)
        out.print(root)
    else:
        _fail(f"--format: {fmt!r} is not a format; expected text, mermaid or dot")


_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?i?B?)\s*$", re.I)
_AGE = re.compile(r"^\s*([0-9.]+)\s*([smhdw])\s*$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise typer.BadParameter(f"{text!r}: expected a size like 500MB, 20GB or 1.5TiB")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = " KMGT".index(unit[:1] or " ") if unit else 0
    return int(float(m.group(1)) * base**power)


def parse_age(text: str) -> float:
    m = _AGE.match(text)
    if not m:
        raise typer.BadParameter(f"{text!r}: expected an age like 12h, 30d or 2w")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2).lower()]


@cache_app.command("ls")
def cache_ls(cache_dir: Optional[Path] = CacheDir, as_json: bool = typer.Option(False, "--json"),
             remote: bool = typer.Option(False, "--remote", help="List the remote cache's records instead."),
             remote_cache: Optional[str] = RemoteCacheOption) -> None:
    """List cached nodes, most recently built last."""
    if remote:
        if not remote_cache:
            _fail("--remote: give --remote-cache URL or set MLCBUILD_REMOTE_CACHE")
        from mlcbuild.cache.remote import RemoteUnavailable

        try:
            records = sorted(_remote(remote_cache, "read").records(), key=lambda r: r.created)
        except (NotImplementedError, RemoteUnavailable) as exc:
            _fail(f"--remote: {exc}", EXIT_BUILD_FAILED)
    else:
        records = sorted(ArtifactStore(cache_dir).records(), key=lambda r: r.created)
    if as_json:
        for r in records:
            _json_event({"key": r.key, "label": r.label, "stage": r.stage, "bytes": r.size,
                         "files": len(r.outputs), "created": r.created, "duration_s": r.duration_s})
        return
    from rich.table import Table

    table = Table("key", "node", "files", "size", "built", "took")
    for r in records:
        table.add_row(r.key[:16], r.label, str(len(r.outputs)), _size(r.size),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), f"{r.duration_s:.2f}s")
    out.print(table)


@cache_app.command("push")
def cache_push(recipes: list[Path] = typer.Argument(..., help="Recipe YAML file(s)."),
               remote_cache: Optional[str] = RemoteCacheOption, cache_dir: Optional[Path] = CacheDir,
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Upload every node of the recipes that the local cache holds to the remote cache."""
    _sync("push", recipes, remote_cache, cache_dir, as_json)


@cache_app.command("pull")
def cache_pull(recipes: list[Path] = typer.Argument(..., help="Recipe YAML file(s)."),
               remote_cache: Optional[str] = RemoteCacheOption, cache_dir: Optional[Path] = CacheDir,
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Download every node of the recipes that the remote cache holds into the local cache."""
    _sync("pull", recipes, remote_cache, cache_dir, as_json)


def _sync(direction: str, recipes: list[Path], remote_cache: str | None, cache_dir: Path | None, as_json: bool) -> None:
    if not remote_cache:
        _fail("give --remote-cache URL or set MLCBUILD_REMOTE_CACHE")
    remote = _remote(remote_cache, "write" if direction == "push" else "read")
    graph = Graph()
    for recipe in recipes:
        graph.merge(_graph(_load(recipe)))
    with _HumanProgress() as human:
        executor = _executor(graph, cache_dir, RunOptions(), _json_event if as_json else human, remote)
        try:
            counts = executor.sync(direction)
        except (ValueError, ConnectionError) as exc:
            _fail(str(exc), EXIT_BUILD_FAILED)
    if as_json:
        _json_event({"event": f"{direction}_done", **counts})
        return
    done = counts["pushed"] if direction == "push" else counts["pulled"]
    console.print(f"[green]ok[/green] {done} node(s) {direction}ed, {counts['present']} already here, "
                  f"{counts['missing']} in neither cache")


@cache_app.command("info")
def cache_info(key: Optional[str] = typer.Argument(None, help="A node key (or prefix)."),
               cache_dir: Optional[Path] = CacheDir) -> None:
    """Show the cache's location and size, or one node's record."""
    store = ArtifactStore(cache_dir)
    if key is None:
        records, blobs, size = store.usage()
        out.print(f"cache:   {store.root}\nrecords: {records}\nblobs:   {blobs}\nsize:    {_size(size)}")
        return
    matches = [r for r in store.records() if r.key.startswith(key)]
    if len(matches) != 1:
        _fail(f"{len(matches)} records match key {key!r}; give a longer prefix" if matches else f"no record with key {key!r}")
    out.print_json(matches[0].model_dump_json())


@cache_app.command("verify")
def cache_verify(cache_dir: Optional[Path] = CacheDir) -> None:
    """Check every blob against its digest; drop bad blobs and the records that need them."""
    problems = ArtifactStore(cache_dir).verify()
    for problem in problems:
        out.print(problem, markup=False)
    if problems:
        out.print(f"{len(problems)} problem(s); the affected nodes will be rebuilt on the next run")
        raise typer.Exit(EXIT_BUILD_FAILED)
    out.print("cache OK")


@cache_app.command("gc")
def cache_gc(
    max_size: Optional[str] = typer.Option(None, "--max-size", help="Evict least recently used until the cache fits (e.g. 20GB)."),
    older_than: Optional[str] = typer.Option(None, "--older-than", help="Evict what was not used for this long (e.g. 30d)."),
    cache_dir: Optional[Path] = CacheDir,
) -> None:
    """Evict cached nodes; never what a running build holds."""
    if max_size is None and older_than is None:
        _fail("give --max-size and/or --older-than")
    store = ArtifactStore(cache_dir)
    evicted, freed = store.gc(parse_size(max_size) if max_size else None, parse_age(older_than) if older_than else None)
    out.print(f"evicted {len(evicted)} node(s), freed {_size(freed)}")


@cache_app.command("rm")
def cache_rm(keys: list[str] = typer.Argument(..., help="Node keys (or prefixes) to forget."),
             cache_dir: Optional[Path] = CacheDir) -> None:
    """Forget cached nodes (their blobs go at the next gc)."""
    store = ArtifactStore(cache_dir)
    for key in keys:
        removed = store.remove(key)
        if not removed:
            _fail(f"no record with key {key!r}")
        out.print(f"removed {', '.join(r[:16] for r in removed)}")


@app.command()
def verify(
    target: Path = typer.Argument(..., help="A bundle directory (dist/<name>/<quantization>-<device>) or its tarball."),
    pubkey: Optional[Path] = typer.Option(None, "--pubkey", help="Check the provenance statement's signature with this Ed25519 public key (PEM)."),
    provenance: Optional[Path] = typer.Option(None, "--provenance", help="The statement (default: TARBALL.intoto.jsonl, or BUNDLE.tar.gz.intoto.jsonl beside a bundle)."),
) -> None:
    """Check a bundle or tarball: every file against its manifest (sha256), and against the signed provenance."""
    from mlcbuild.provenance import ProvenanceError, verify as verify_target

    try:
        result = verify_target(_named(target), pubkey, provenance)
    except ProvenanceError as exc:
        _fail(str(exc))
    for problem in result.problems:
        out.print(problem, markup=False)
    if result.problems:
        raise typer.Exit(EXIT_BUILD_FAILED)
    out.print(f"{target}: OK ({'; '.join(result.checked)})", markup=False)


@app.command()
def pack(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Archive path (default: BUNDLE.tar.gz)."),
    sign_key: Optional[Path] = typer.Option(None, "--sign-key", help="Sign the provenance with this Ed25519 private key (PEM PKCS8: `mlcbuild keygen`, `openssl genpkey -algorithm ed25519`)."),
) -> None:
    """Write a reproducible .tar.gz of a bundle and its provenance statement (in-toto, SLSA) beside it."""
    from mlcbuild.provenance import ProvenanceError, key_id, load_private_key, pack_bundle

    bundle = _named(bundle)
    if not bundle.is_dir():
        _fail(f"{bundle}: not a bundle directory")
    try:
        key = load_private_key(sign_key) if sign_key is not None else None
    except ProvenanceError as exc:
        _fail(str(exc))
    try:
        tarball, statement = pack_bundle(bundle, output or bundle.with_name(bundle.name + ".tar.gz"), key)
    except FileNotFoundError as exc:
        _fail(str(exc), EXIT_BUILD_FAILED)
    except ProvenanceError as exc:
        _fail(str(exc), EXIT_BUILD_FAILED)
    out.print(str(tarball), markup=False)
    out.print(f"{statement} ({f'signed, keyid {key_id(key.public_key())}' if key else 'unsigned'})", markup=False)


def _named(path: Path) -> Path:
    """``.`` or ``..`` as the directory's own name: a bundle's name is its tarball's top directory."""
    return path.resolve() if path.name in ("", "..") else path


@app.command()
def keygen(path: Path = typer.Argument(..., help="Private key file to write (PATH.pub gets the public key).")) -> None:
    """Make an Ed25519 key pair for `pack --sign-key`: PATH (private, mode 0600) and PATH.pub."""
    from mlcbuild.provenance import ProvenanceError, generate_key_pair

    try:
        keyid = generate_key_pair(path)
    except ProvenanceError as exc:
        _fail(str(exc))
    out.print(f"{path} (private: keep it secret), {path}.pub (public); keyid {keyid}", markup=False)


@app.command()
def lock(
    recipe: Path = typer.Argument(..., help="Recipe YAML file with an HF:// source."),
    update: bool = typer.Option(False, "--update", help="Resolve the revision anew and move the lock to it."),
) -> None:
    """Pin a Hub source to one commit and its files' digests in <recipe>.lock."""
    from mlcbuild.stages.download import locked_source, update_lock
    from mlcbuild.sources.lock import lock_path

    loaded = _load(recipe)
    try:
        if update:
            update_lock(loaded)
        pinned = locked_source(loaded)
    except RecipeError as exc:
        _fail(str(exc))
    out.print(f"{lock_path(loaded.path)}: {pinned.source}@{pinned.revision} -> {pinned.commit} "
              f"({len(pinned.files)} files)", markup=False)


DeviceOption = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
NoBuildOption = typer.Option(False, "--no-build", help="With a recipe: use its bundle as built; do not build it "
                             "first when missing or stale.")


@app.command()
def chat(
    model: str = typer.Argument(..., help="A bundle directory, or a recipe (its built bundle for the device is used)."),
    device: str = DeviceOption,
    overrides: Optional[str] = typer.Option(None, "--overrides", help="Initial settings, as /set takes them: temperature=0.5;max_gen_len=100"),
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q", help="With a recipe: which of its quantizations."),
    tensor_parallel_shards: Optional[int] = typer.Option(None, "--tensor-parallel-shards", min=1, help="The recipe's bundle built for this many shards (also --overrides tensor_parallel_shards=N)."),
    no_build: bool = NoBuildOption,
) -> None:
    """Chat with a model in the terminal (/help lists the commands)."""
    from mlcbuild.runtime.chat import chat as run_chat

    shards = {"tensor_parallel_shards": tensor_parallel_shards} if tensor_parallel_shards else {}
    _run_frontend(run_chat, model, no_build, device=device, overrides=overrides, **shards, **_quant(quantization))


@app.command()
def serve(
    model: str = typer.Argument(..., help="A bundle directory, or a recipe."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MLCBUILD_API_KEY", help="Require this bearer token."),
    device: str = DeviceOption,
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q"),
    max_batch_size: Optional[int] = typer.Option(None, "--max-batch-size", min=1, help="Sequences decoded together (at most what the library was compiled for)."),
    kv_cache_tokens: Optional[int] = typer.Option(None, "--kv-cache-tokens", min=1, help="KV-cache capacity in tokens, over all sequences."),
    context_window_size: Optional[int] = typer.Option(None, "--context-window-size", min=1, help="Longest prompt + completion (at most the bundle's)."),
    prefill_chunk_size: Optional[int] = typer.Option(None, "--prefill-chunk-size", min=1, help="Prompt tokens prefilled per step."),
    overrides: Optional[str] = typer.Option(None, "--overrides", help="MLC LLM's engine overrides: 'context_window_size=1024;prefill_chunk_size=128;max_num_sequence=8;max_total_seq_length=8192' (max_num_sequence: --max-batch-size; max_total_seq_length: --kv-cache-tokens)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", min=0, help="Requests that may wait beyond the running batch; more get 429 (default: unbounded)."),
    request_timeout: Optional[float] = typer.Option(None, "--request-timeout", min=0.001, help="Seconds a request may take from arrival; then its generation stops (504, or an error event ending the stream)."),
    max_body_bytes: int = typer.Option(4 << 20, "--max-body-bytes", min=1, help="Larger request bodies get 413."),
    allow_origins: list[str] = typer.Option([], "--allow-origins", help="A browser origin allowed by CORS (repeat it; '*' for any). Default: no CORS headers."),
    prefix_cache: str = typer.Option("on", "--prefix-cache", help="on: reuse the KV cache of earlier requests' shared prompt prefixes (off for sliding-window bundles); off: prefill every prompt whole."),
    speculative_mode: Optional[str] = typer.Option(None, "--speculative-mode", help="off; prompt-lookup: propose tokens from n-grams of the prompt and output; draft: a smaller model (--draft) proposes them. Verified in one step of the model: greedy and seeded outputs unchanged. Default: the recipe's speculative section, else off."),
    speculative_tokens: Optional[int] = typer.Option(None, "--speculative-tokens", min=1, help="Tokens proposed per step (default: the recipe's, else 4)."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Draft model for --speculative-mode draft (implied): a bundle directory or a recipe (built first unless --no-build). Same tokenizer and device as the model."),
    draft_quantization: Optional[str] = typer.Option(None, "--draft-quantization", help="With a recipe --draft: which of its quantizations."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, "--gpu-memory-utilization", min=0.01, max=1.0, help="Share of free device memory (available RAM on CPU) the KV cache may take when --kv-cache-tokens is not given (default 0.9)."),
    no_build: bool = NoBuildOption,
) -> None:
    """Serve a model over an OpenAI-compatible REST API."""
    from mlcbuild.runtime.server import parse_overrides
    from mlcbuild.runtime.server import serve as run_server

    options: dict[str, Any] = {}
    try:
        options.update(parse_overrides(overrides or ""))
    except ValueError as exc:
        _fail(str(exc))
    for name, value in (("max_batch_size", max_batch_size), ("kv_cache_tokens", kv_cache_tokens),
                        ("context_window_size", context_window_size), ("prefill_chunk_size", prefill_chunk_size)):
        if value is None:
            continue
        if options.get(name, value) != value:  # two different answers: say so rather than pick one silently
            _fail(f"--{name.replace('_', '-')} {value} contradicts --overrides, which sets it to {options[name]}")
        options[name] = value
    if prefix_cache not in ("on", "off"):
        _fail(f"--prefix-cache {prefix_cache!r}: expected on or off")
    if speculative_mode not in (None, "off", "prompt-lookup", "draft"):
        _fail(f"--speculative-mode {speculative_mode!r}: expected off, prompt-lookup or draft")
    if draft is not None and speculative_mode not in (None, "draft"):
        _fail(f"--draft goes with --speculative-mode draft, not {speculative_mode}")
    options.update(prefix_cache=prefix_cache == "on", speculative_mode=speculative_mode,
                   speculative_tokens=speculative_tokens, draft=draft, draft_quantization=draft_quantization)
    if gpu_memory_utilization is not None:
        options["gpu_memory_utilization"] = gpu_memory_utilization
    from mlcbuild.runtime.server import EngineDiedError

    try:
        _run_frontend(run_server, model, no_build, host=host, port=port, api_key=api_key, device=device,
                      max_queue=max_queue, request_timeout=request_timeout, max_body_bytes=max_body_bytes,
                      allow_origins=tuple(allow_origins), **options, **_quant(quantization))
    except EngineDiedError as exc:  # e.g. a tensor-parallel worker died: exit non-zero for a supervisor to restart
        _fail(str(exc), EXIT_BUILD_FAILED)


@app.command()
def bench(
    model: str = typer.Argument(..., help="A bundle directory, or a recipe."),
    device: str = DeviceOption,
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q"),
    prompt_len: int = typer.Option(128, "--prompt-len", min=1),
    gen_len: int = typer.Option(128, "--gen-len", min=1),
    batch: int = typer.Option(1, "--batch", min=1),
    repeats: int = typer.Option(3, "--repeats", min=1),
    as_json: bool = typer.Option(False, "--json"),
    no_build: bool = NoBuildOption,
) -> None:
    """Measure TTFT, prefill and decode speed (median, min, max over repeats) and memory."""
    from mlcbuild.runtime.bench import bench as run_bench
    from mlcbuild.runtime.bundle import BundleError

    if not no_build:
        _build_first(model, device, quantization)
    try:
        result = run_bench(model, device, prompt_len=prompt_len, gen_len=gen_len, batch=batch, repeats=repeats,
                           **_quant(quantization))
    except (BundleError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc), EXIT_BUILD_FAILED)
    if as_json:
        print(json.dumps(result.as_dict(), sort_keys=True))
        return
    from rich.table import Table

    table = Table("metric", "median", "min", "max", title=f"{result.model} ({result.quantization}, {result.device}): "
                  f"prompt {prompt_len}, generate {gen_len}, batch {batch}, {repeats} repeats")
    for name, spread, fmt in (("TTFT (ms)", result.ttft_s, lambda v: f"{v * 1000:.1f}"),
                              ("prefill tok/s", result.prefill_tok_s, lambda v: f"{v:.1f}"),
                              ("decode tok/s", result.decode_tok_s, lambda v: f"{v:.1f}")):
        table.add_row(name, fmt(spread.median), fmt(spread.min), fmt(spread.max))
    out.print(table)
    out.print(f"weights {_size(result.weights_bytes)}, peak RSS {_size(result.peak_rss_bytes)}, "
              f"threads {result.threads}")


@eval_app.command("ppl")
def eval_ppl(
    model: str = typer.Argument(..., help="A bundle directory, or a recipe."),
    text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
    ctx: Optional[int] = typer.Option(None, "--ctx", min=4, help="Tokens per chunk (default 512, or the context "
                                      "window when smaller); the second half of each chunk is scored."),
    stride: int = typer.Option(0, "--stride", min=0, help="Windows of --ctx every N tokens, the last N of each "
                               "scored (llama-perplexity --ppl-stride); 0: non-overlapping chunks."),
    chunks: Optional[int] = typer.Option(None, "--chunks", min=1, help="Score only the first N chunks."),
    device: str = DeviceOption,
    quantization: Optional[str] = typer.Option(None, "--quantization", "-q"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    no_build: bool = NoBuildOption,
) -> None:
    """Perplexity on a text, as llama.cpp's llama-perplexity computes it (same chunks, same scored tokens)."""
    from mlcbuild.runtime.bundle import BundleError
    from mlcbuild.runtime.perplexity import PerplexityError, perplexity

    try:
        content = text.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"--text: cannot read {text}: {exc}")
    if not no_build:
        _build_first(model, device, quantization)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    with Progress(TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks  PPL {task.fields[ppl]}"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("ppl", total=None, ppl="-")

        def on_chunk(done: int, total: int, ppl: float) -> None:
            bar.update(task, completed=done, total=total, ppl=f"{ppl:.4f}")

        try:
            result = perplexity(model, content, ctx, stride, device, quantization, chunks, build=False, on_chunk=on_chunk)
        except PerplexityError as exc:
            _fail(str(exc))
        except (BundleError, FileNotFoundError) as exc:
            _fail(str(exc), EXIT_BUILD_FAILED)
    if as_json:
        print(result.model_dump_json())
        return
    mode = f"windows of {result.ctx} every {result.stride}" if result.stride else f"chunks of {result.ctx}"
    out.print(f"{result.model} ({result.quantization}, {result.device}): PPL = {result.ppl:.4f} +/- "
              f"{result.ppl_error:.5f}  [{result.chunks} {mode}, {result.scored_tokens} of {result.text_tokens} tokens "
              f"scored, {result.tokens_per_second:.0f} tok/s]", markup=False)


def _quant(quantization: Optional[str]) -> dict[str, Any]:
    return {"quantization": quantization} if quantization else {}


def _build_first(model: str, device: str, quantization: str | None) -> None:
    """Given a recipe, build the bundle a front end would open (the quantization asked for or the
    recipe's first, on the recipe device that ``device`` picks) when it is missing or stale, as
    ``bazel run`` does; printing only what builds. Done here, in process: the runtime never imports
    the pipeline (``MLCEngine`` runs the CLI in a subprocess instead: runtime.bundle.build_with_cli)."""
    path = Path(model).expanduser()
    if not path.is_file():
        return  # a bundle directory: nothing to build
    from mlcbuild.runtime.bundle import BundleError, recipe_target

    loaded = _load(path)
    try:
        target_quant, target_device = recipe_target(loaded.recipe.quantization, loaded.recipe.devices, device,
                                                    quantization)
    except BundleError as exc:
        _fail(f"{path}: {exc}", EXIT_BUILD_FAILED)
    graph = _graph(loaded, [target_device], [target_quant])
    remote = _remote(os.environ.get("MLCBUILD_REMOTE_CACHE"), os.environ.get("MLCBUILD_REMOTE_CACHE_MODE", "read-write"))
    options = RunOptions(jobs=os.cpu_count() or 1, output_dir=Path.cwd())
    with _HumanProgress(quiet=True) as human:
        result = _executor(graph, None, options, human, remote).run()
    if not result.ok:
        _fail(f"building {path} ({target_quant}, {target_device}) failed", EXIT_BUILD_FAILED)
    if result.count("built") or result.count("pulled"):
        console.print(f"[green]ok[/green] built {target_quant}-{target_device} of {escape(str(path))} "
                      f"({result.count('built')} built, {result.count('pulled')} pulled, {result.count('cached')} cached "
                      f"in {result.duration_s:.1f}s)")


def _run_frontend(frontend: Any, model: str, no_build: bool, **kwargs: Any) -> None:
    from mlcbuild.runtime.bundle import BundleError
    from mlcbuild.runtime.speculative import DraftModelError

    if not no_build:
        device = kwargs.get("device", "auto")
        _build_first(model, device, kwargs.get("quantization"))
        if kwargs.get("draft"):
            _build_first(kwargs["draft"], device, kwargs.get("draft_quantization"))
        elif kwargs.get("speculative_mode") is None and Path(model).is_file():  # the recipe's own draft
            section = _load(Path(model)).recipe.speculative
            if section is not None and section.draft_quantization is not None:
                _build_first(model, device, section.draft_quantization)
    try:
        frontend(model, build=False, **{k: v for k, v in kwargs.items() if v is not None})
    except (BundleError, FileNotFoundError) as exc:
        _fail(str(exc), EXIT_BUILD_FAILED)
    except DraftModelError as exc:
        _fail(str(exc))


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json")) -> None:
    """List every device kind: whether this machine can build it (and what to install when not), and
    whether this machine can run its bundles."""
    from mlcbuild.devices import DEVICE_KINDS, build_problems, parse_device, run_here

    rows = []
    for kind in DEVICE_KINDS.values():
        example = kind.name if kind.arch != "required" else f"{kind.name}:{kind.arch_help.split('one of ')[1].split(',')[0]}"
        problems = [p.split(": ", 1)[1] for p in build_problems(parse_device(example))]
        rows.append({"device": kind.name, "written": kind.arch_help, "summary": kind.summary, "build": not problems,
                     "missing": problems, "run": run_here(kind.name), "library": kind.library.file,
                     "loads_with": kind.loads_with})
    if as_json:
        for row in rows:
            out.print(json.dumps(row), markup=False)
        return
    for row in rows:
        mark = "[green]can build[/green]" if row["build"] else "[red]cannot build[/red]"
        out.print(f"[bold]{row['device']:<8}[/bold] {mark:<30} {escape(row['summary'])}")
        out.print(f"         write: {escape(row['written'])}; bundle library: {row['library']}")
        for problem in row["missing"]:
            out.print(f"         [red]missing:[/red] {escape(problem)}")
        out.print(f"         run here: {escape(row['run'])}")
    missing = sum(1 for row in rows if not row["build"])
    out.print(f"{len(rows) - missing} of {len(rows)} device kinds can be built on this machine")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
