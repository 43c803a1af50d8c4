"""The run journal: a no-op rerun answered by ``stat`` alone.

A run of a whole recipe that succeeds (every node cached or built) writes a journal: the stat
of every path its keys were computed from (the recipe and its lock, the source files, the paths
stages declare in ``watch_paths``, the Python modules that computed the keys, the ``sys.path``
directories whose installed distributions gave tool versions) and of every node record and
laid-out output. It is filed under a digest of the command, the interpreter, the environment and
the host CPU. The next identical command checks the journal before importing anything heavy
(``mlcbuild.launcher``): when every stat is unchanged, no key can have changed, so the outcome is
replayed; it costs a few hundred ``stat`` calls instead of ~0.3 s of imports (CLI framework,
pydantic, the stages) and key computation. Any difference, or any doubt, and the full run
decides, as make and ninja decide from mtimes and Bazel's server from its in-memory graph.

Like the stat cache, a journal is not written while a path the keys were read from is younger
than ``RACY_SECONDS``: it could change again within the same mtime tick without its stat changing.

Kept to the standard library and xxhash on purpose (not pydantic): loading this module is the
whole cost of a no-op. The file is private to the cache; a journal that does not parse, or has
another format, is ignored.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from mlcbuild.cache.digests import RACY_SECONDS, canonical_digest
from mlcbuild.atomicfile import write_atomic

FORMAT = 1
# A journal unused this long is deleted when another is written: one is filed per environment a
# recipe ran in (every CI job has its own), and `cache gc` may run rarely.
UNUSED_DAYS = 14

# Watch kinds: what of a path's stat is compared.
FILE = "file"  # size, mtime, inode, mode: a file edited in place or replaced
DIR = "dir"  # mtime, inode: an entry added, removed or renamed
ENTRY = "entry"  # size, inode: an immutable file replaced only by rename, whose mtime is
# touched on use (the cache's node records: gc evicts by it)

Watch = tuple[str, str]  # (absolute path, kind)

# Variables a shell changes between commands that no stage reads; every other variable enters
# the journal's name (as a digest: values may be secrets), so a changed environment is a miss.
VOLATILE_ENV = frozenset({
    "_", "PWD", "OLDPWD", "SHLVL", "COLUMNS", "LINES", "TERM", "COLORTERM", "TERM_PROGRAM",
    "TERM_PROGRAM_VERSION", "TERM_SESSION_ID", "WINDOWID", "DISPLAY", "TMUX", "TMUX_PANE", "STY",
    "SSH_TTY", "SSH_CLIENT", "SSH_CONNECTION", "SSH_AUTH_SOCK", "PS1", "PROMPT_COMMAND",
    "HISTFILE", "LS_COLORS", "MAIL", "NO_COLOR", "FORCE_COLOR", "XDG_SESSION_ID", "XDG_VTNR",
})


def signature(path: str, kind: str) -> list[int] | None:
    """What of ``path``'s stat a journal compares for ``kind``; None when it does not exist."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if kind == FILE:
        return [st.st_size, st.st_mtime_ns, st.st_ino, stat.S_IMODE(st.st_mode)]
    if kind == DIR:
        return [st.st_mtime_ns, st.st_ino]
    if kind == ENTRY:
        return [st.st_size, st.st_ino]
    raise ValueError(f"unknown watch kind {kind!r}")


def identity(command: dict[str, str]) -> dict[str, Any]:
    """Everything outside the watched files that a run's keys can depend on, with the command."""
    from mlcbuild import __version__
    from mlcbuild.hostinfo import cpu_identity

    env = {k: v for k, v in os.environ.items() if k not in VOLATILE_ENV}
    return {
        "format": FORMAT,
        "mlcbuild": __version__,
        "command": command,
        "cwd": os.getcwd(),
        "python": sys.version,
        "executable": sys.executable,
        "sys_path": list(sys.path),
        "host": os.uname().nodename,
        "cpu": canonical_digest(cpu_identity()),
        "env": canonical_digest(env),
    }


def run_identity(recipe: Path, cache_root: Path) -> dict[str, Any]:
    """The identity of ``run RECIPE`` on the cache at ``cache_root`` (options that cannot
    change what an all-cached run does, like ``--jobs``, are not part of it)."""
    return identity({"command": "run", "recipe": str(Path(recipe).resolve()), "cache": str(Path(cache_root).resolve())})


def journal_path(cache_root: Path, ident: dict[str, Any]) -> Path:
    return Path(cache_root) / "journal" / f"{canonical_digest(ident)}.json"


def python_watches() -> list[Watch]:
    """The Python side of a run's keys: every loaded module's file outside the standard library
    (the stages' code and versions, plugins, the libraries that validate params) and every
    ``sys.path`` directory that holds installed distributions (installing, upgrading or removing
    one adds or removes a ``*.dist-info`` entry there, and tool versions are read from those)."""
    stdlib = os.path.dirname(os.path.realpath(os.__file__)) + os.sep
    files = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file or not os.path.isfile(file):
            continue  # built in, frozen, or a script read from stdin
        real = os.path.realpath(file)
        # (some distributions install site-packages inside the standard library's directory)
        if not real.startswith(stdlib) or "-packages" + os.sep in real[len(stdlib):]:
            files.add(os.path.abspath(file))
    watches = [(file, FILE) for file in sorted(files)]
    for entry in sys.path:
        entry = os.path.abspath(entry or ".")
        if os.path.isfile(entry):  # a zip archive
            watches.append((entry, FILE))
        elif os.path.isdir(entry) and any(name.endswith((".dist-info", ".egg-info")) for name in os.listdir(entry)):
            watches.append((entry, DIR))
    return watches


def write(path: Path, ident: dict[str, Any], read: Iterable[Watch], produced: Iterable[Watch],
          replay: dict[str, Any]) -> bool:
    """Record the watched paths as they are now, with what to ``replay``: ``read``, what the keys
    were computed from, and ``produced``, what the run wrote (records, laid-out outputs). False,
    and no journal, when a ``read`` path is too young to be trusted. A young ``produced`` path is
    fine: the pipeline writes those by atomic rename and the full run itself trusts them by
    inode, so a journal written right after a build makes the first rerun fast."""
    now = time.time()
    entries = []
    for file, kind in dict.fromkeys(read):
        sig = signature(file, kind)
        if sig is not None and kind != ENTRY and now - sig[0 if kind == DIR else 1] / 1e9 < RACY_SECONDS:
            discard(path)
            return False
        entries.append([file, kind, sig])
    entries += [[file, kind, signature(file, kind)] for file, kind in dict.fromkeys(produced)]
    data = json.dumps({"identity": ident, "watched": entries, "replay": replay}, separators=(",", ":")).encode()
    write_atomic(path, data)
    for other in path.parent.glob("*.json"):
        try:
            if now - other.stat().st_mtime > UNUSED_DAYS * 86400:
                other.unlink()
        except FileNotFoundError:
            pass
    return True


def discard(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


def check(path: Path, ident: dict[str, Any]) -> tuple[dict[str, Any], int] | None:
    """(what to replay, number of paths checked) when the journal at ``path`` was written for
    ``ident`` and nothing it watched changed since; else None. Its entries are marked used."""
    try:
        data = json.loads(Path(path).read_bytes())
        if data["identity"] != ident:
            return None
        watched = data["watched"]
        for file, kind, sig in watched:
            if signature(file, kind) != sig:
                return None
        for file, kind, _ in watched:
            if kind == ENTRY:
                os.utime(file)
        os.utime(path)  # used now (journals unused for UNUSED_DAYS are pruned)
        return data["replay"], len(watched)
    except (OSError, ValueError, KeyError, TypeError):
        return None
