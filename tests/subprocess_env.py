"""Environments for the subprocesses tests start. A module of its own, not conftest.py: test modules
import it by name, and ``conftest`` is ambiguous in a run that also collects tests/pipeline (whose own
conftest.py then answers ``import conftest``)."""

from __future__ import annotations

import os


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without mlcbuild's own variables (a developer's cache or remote
    must not leak into a test), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLCBUILD_")}
    env.update(extra)
    return env
