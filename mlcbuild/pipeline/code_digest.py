"""The digest of the code that makes a node's output: it enters the node's key.

A stage names the modules its output depends on (``Stage.code_modules``; by default the modules
defining its class and base classes). Their closure is every module they import, directly or
through each other, within the same top-level package (``mlcbuild`` for the built-in stages,
``fake_stages`` for the engine's tests); other packages are tools, covered by the toolchain facts
a stage declares. Imports are found statically with ``ast``:

* an import inside a function counts like one at the top (the compile stage loads the compiler
  passes, models and quantization schemes lazily);
* relative imports resolve against the importing module's package, and ``from pkg import name``
  is the submodule ``pkg.name`` where one exists, else ``pkg`` itself;
* a string literal spelling the dotted name of a module of the package counts as an import:
  registries import by name (``models.ARCHITECTURES``, ``quantization.scheme``'s families);
* importing a module runs its packages' ``__init__`` first: they are in the closure too.

The digest is over the sorted (path relative to the directory holding the top-level package,
content digest) pairs, so the same source gives the same digest on every machine, wherever it is
checked out. Content digests come from the stat cache (one ``stat`` per unchanged file), and each
file's parsed import list is remembered by its content digest, in memory and in the stat cache's
database, so a no-op ``plan`` parses nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
import threading
from pathlib import Path
from typing import Iterable, NamedTuple

from mlcbuild.cache.digests import StatCache, canonical_digest

# Left out of every closure (with what only they import). The engine (pipeline, cache) and the
# recipe schema: what they contribute to a node's output reaches the stage through its params,
# its inputs' content and its toolchain facts, which are in the key already; with them in it, an
# edit of the executor would rebuild everything. The same holds for the stage registry (the
# ``stages`` package's ``__init__``, not the stages) and the top-level ``__init__`` (the version,
# which the stages that record it declare as a toolchain fact, and the runtime's lazily imported
# public API, which makes no build output).
EXCLUDED_PACKAGES = ("mlcbuild.pipeline", "mlcbuild.cache", "mlcbuild.recipe")
EXCLUDED_MODULES = ("mlcbuild", "mlcbuild.stages")

# Bump when the parsed form of an import list changes (remembered lists of another format are
# parsed again).
_IMPORTS_FORMAT = "imports-1"
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")

# content digest -> the file's imports as parsed by _parse_imports (content-addressed: valid for
# any path, any process lifetime)
_IMPORTS: dict[str, list] = {}
# CPython 3.11's ast.parse is not thread-safe: two threads converting trees at once fail with
# "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905); the executor
# computes the keys of several nodes on its threads.
_PARSE_LOCK = threading.Lock()


class CodeFile(NamedTuple):
    relpath: str  # relative to the directory holding the top-level package, '/'-separated
    digest: str  # content digest (the stat cache's)
    path: Path  # where it is on this machine (for the run journal's watches)


def excluded(module: str) -> bool:
    return module in EXCLUDED_MODULES or any(module == p or module.startswith(p + ".") for p in EXCLUDED_PACKAGES)


def code_digest(files: Iterable[CodeFile]) -> str:
    """The digest of a closure: its (relative path, content digest) pairs, sorted."""
    return canonical_digest(sorted([f.relpath, f.digest] for f in files))


def code_closure(stat_cache: StatCache, modules: Iterable[str]) -> list[CodeFile]:
    """The files of ``modules`` and of every module of their top-level package they import,
    sorted by relative path. A module that is not found, or not Python source, is skipped."""
    found: dict[str, CodeFile] = {}
    for module in modules:
        _Closure(stat_cache, module.split(".", 1)[0]).walk(module, found)
    return sorted(found.values())


class _Closure:
    """The closure within one top-level package (``top``)."""

    def __init__(self, stat_cache: StatCache, top: str) -> None:
        self.stat_cache = stat_cache
        self.top = top
        self.base = _package_base(top)
        self._files: dict[str, Path | None] = {}

    def walk(self, start: str, found: dict[str, CodeFile]) -> None:
        if self.base is None:
            return
        queue = [start, *_parents(start)]
        seen: set[str] = set()
        while queue:
            module = queue.pop()
            if module in seen or excluded(module) or module.split(".", 1)[0] != self.top:
                continue
            seen.add(module)
            path = self.file_of(module)
            if path is None:
                continue
            digest = self.stat_cache.digest(path)[0]
            relpath = path.relative_to(self.base).as_posix()
            found[relpath] = CodeFile(relpath, digest, path)
            for imported in self.resolve(module, path, self.imports_of(path, digest)):
                queue.append(imported)
                queue.extend(_parents(imported))

    def file_of(self, module: str) -> Path | None:
        """The source file of a module of this package (its ``__init__.py`` for a package)."""
        try:
            return self._files[module]
        except KeyError:
            pass
        stem = os.path.join(str(self.base), *module.split("."))
        found = None
        for candidate in (stem + ".py", os.path.join(stem, "__init__.py")):
            if os.path.isfile(candidate):
                found = Path(candidate)
                break
        self._files[module] = found
        return found

    def imports_of(self, path: Path, digest: str) -> list:
        imports = _IMPORTS.get(digest)
        if imports is None:
            remembered = self.stat_cache.derived(_IMPORTS_FORMAT, digest)
            if remembered is not None:
                imports = json.loads(remembered)
            else:
                imports = _parse_imports(path.read_bytes(), str(path))
                self.stat_cache.remember(_IMPORTS_FORMAT, digest, json.dumps(imports))
            _IMPORTS[digest] = imports
        return imports

    def resolve(self, module: str, path: Path, imports: list) -> list[str]:
        """The module names ``imports`` (parsed from ``module``'s file ``path``) refer to."""
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        names: list[str] = []
        for entry in imports:
            kind = entry[0]
            if kind == "import":
                names.append(entry[1])
            elif kind == "name":
                if entry[1].split(".", 1)[0] == self.top and self.file_of(entry[1]):
                    names.append(entry[1])
            elif kind == "from":
                _, level, source, imported = entry
                if level:
                    parts = package.split(".") if package else []
                    if level - 1 > len(parts):
                        continue  # beyond the top-level package
                    parts = parts[: len(parts) - (level - 1)]
                    source = ".".join(parts + ([source] if source else []))
                if not source:
                    continue
                names.append(source)
                if source.split(".", 1)[0] != self.top:
                    continue
                source_file = self.file_of(source)
                if source_file is None or source_file.name != "__init__.py":
                    continue  # a plain module (or none): what it gives are attributes, not submodules
                for name in imported:
                    if name != "*" and self.file_of(f"{source}.{name}"):
                        names.append(f"{source}.{name}")
        return [n for n in names if n.split(".", 1)[0] == self.top]


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _package_base(top: str) -> Path | None:
    """The directory that holds the top-level package (or module) ``top``, without importing it."""
    loaded = sys.modules.get(top)
    locations = list(getattr(loaded, "__path__", []) or [])
    origin = getattr(loaded, "__file__", None)
    if loaded is None:
        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [])
        origin = spec.origin if spec.has_location else None
    if locations:  # a package (its __init__ is in it), or a namespace package
        return Path(locations[0]).resolve().parent
    if origin and origin.endswith(".py"):
        return Path(origin).resolve().parent
    return None


def _parse_imports(source: bytes, filename: str) -> list:
    """Every import of a module's source, wherever it is (top level, function, ``if`` block):
    ``["import", name]``, ``["from", level, module, [names]]``, and ``["name", dotted]`` for a
    string literal that could name a module."""
    with _PARSE_LOCK:
        tree = ast.parse(source, filename=filename)
    found: list = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [["import", alias.name] for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(["from", node.level, node.module or "", [alias.name for alias in node.names]])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.fullmatch(node.value):
            found.append(["name", node.value])
    return found
