"""The contract between the build engine and a stage.

A stage is a small class: a name, a version, a pydantic schema for its params, and ``run()``.
The engine knows nothing else about what a stage does; everything that can change a stage's
output must reach it through its params, its inputs (upstream outputs, by content), the
external source files it declares, or the toolchain facts it declares. Its own code is in the key
too: the modules it names (``code_modules``) and every module of their package they import, lazily
imported ones included (``pipeline.code_digest``), so an edit of a kernel schedule rebuilds what it
compiled without anyone bumping ``version`` (which stays, as a note of what changed when).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ConfigDict


class StageParams(BaseModel):
    """Base class of every stage's params: frozen and strict about unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class Resources:
    """What building one node needs, for backends that place nodes on machines (a cluster):
    CPUs, a memory estimate, and custom resources naming a toolchain a machine must have
    (e.g. ``{"nvcc": 1}``): a heterogeneous cluster routes the node to a worker that has it."""

    cpus: float = 1.0
    memory_bytes: int = 0
    custom: dict[str, float] = field(default_factory=dict)


class StageError(Exception):
    """A stage failed for a reason a user can act on (the message says what to do)."""


@dataclass
class StageContext:
    """What ``Stage.run`` gets.

    ``inputs`` maps each input name to a read-only directory holding that upstream node's
    outputs (hard links into the cache: never modify them). ``out`` is an empty private
    directory; everything written there becomes the node's output once ``run`` returns.
    ``work`` is scratch space that is thrown away.
    """

    params: Any
    inputs: dict[str, Path]
    out: Path
    work: Path
    toolchain: dict[str, str]
    key: str
    lineage: dict[str, str] = field(default_factory=dict)  # label -> key of every ancestor node
    log: Callable[[str], None] = field(default=lambda msg: logging.getLogger("mlcbuild").info(msg))
    progress: Callable[[int, int | None], None] = field(default=lambda done, total: None)
    on_warning: Callable[[str], None] = field(default=lambda msg: logging.getLogger("mlcbuild").warning(msg))
    warnings: list[str] = field(default_factory=list)  # what ``warn`` reported (kept in the node record)

    def warn(self, message: str) -> None:
        """Report something about a node that succeeded which its user must not miss (a kernel
        that fell back to a slower schedule): shown by the CLI and kept in the node's record."""
        self.warnings.append(message)
        self.on_warning(message)


class Stage(ABC):
    name: ClassVar[str]
    version: ClassVar[int]
    Params: ClassVar[type[StageParams]]
    # When true, the keys of every ancestor node enter this node's key and reach run() as
    # ``ctx.lineage`` (the package stage records them in the bundle manifest).
    records_lineage: ClassVar[bool] = False
    # False for stages whose libraries keep process-global state (TVM's BlockBuilder stack, for
    # one): the engine never runs two such nodes at once in one process.
    thread_safe: ClassVar[bool] = True

    def toolchain(self, params: Any) -> dict[str, str]:
        """Facts about the tools this stage uses that can change its output (enter the key)."""
        return {}

    def key_params(self, params: Any) -> dict[str, Any]:
        """The params as they enter the key. A stage may leave out what only says *where* to
        read content that enters the key anyway (an absolute source path, whose files are in
        ``source_paths``), so that two checkouts of one recipe share keys and bundles."""
        return params.model_dump(mode="json")

    def resources(self, params: Any) -> Resources:
        """What building a node of this stage needs (see ``Resources``)."""
        return Resources()

    def code_modules(self, params: Any) -> list[str]:
        """The modules whose code makes this stage's output. The key covers their source and
        that of every module of their top-level package they import, found statically (see
        ``pipeline.code_digest``). Default: the modules defining this class and its base classes."""
        return list(dict.fromkeys(cls.__module__ for cls in type(self).__mro__
                                  if issubclass(cls, Stage) and cls is not Stage))

    def preload_modules(self, params: Any) -> list[str]:
        """Modules ``run`` imports that take long to import (TVM's): a backend that readies a
        fresh worker process before its first node (``Backend.warm``) imports them then, so the
        node does not wait for them. Default: none."""
        return []

    def source_paths(self, params: Any) -> list[Path]:
        """Files or directories outside the cache whose content enters the key (digested through
        the stat cache, so an unchanged multi-GB source costs a stat per file, not a read)."""
        return []

    def watch_paths(self, params: Any) -> list[Path]:
        """Paths outside ``source_paths`` whose change can change this node's params or toolchain
        facts: a directory the params were chosen by listing, a compiler's executable. The run
        journal watches their stat so a no-op rerun answered by ``stat`` alone notices. (Python
        distributions need no listing: the journal watches the ``sys.path`` directories.)"""
        return []

    @abstractmethod
    def run(self, ctx: StageContext) -> None: ...
