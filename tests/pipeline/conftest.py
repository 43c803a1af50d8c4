"""Fixtures for the engine's tests: a workspace with a recipe, a source dir and a private cache,
and a runner that invokes the real `mlcbuild` CLI in a subprocess with the test-defined stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).parent

RECIPE = """\
name: toy
source: src
quantization: [q0f16, q4f16_1]
devices: [cpu, cuda:sm_80]
overrides:
  context_window_size: 512
"""


@dataclass
class Workspace:
    root: Path
    env: dict = field(default_factory=dict)

    @property
    def recipe(self) -> Path:
        return self.root / "toy.yaml"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def log(self) -> Path:
        return self.root / "ran.log"

    def ran(self) -> list[str]:
        """Node labels that ran since the last call (and clear the log)."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().split()
        self.log.unlink()
        return sorted(lines)

    def command(self, *args: str, entry: str = "mlcbuild.cli") -> list[str]:
        return [sys.executable, "-m", entry, *args]

    def popen(self, *args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(*args), env={**self.env, **(env or {})}, cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)

    def mlcbuild(self, *args: str, env: dict | None = None, check: bool = True,
                 entry: str = "mlcbuild.cli") -> subprocess.CompletedProcess:
        proc = subprocess.run(self.command(*args, entry=entry), env={**self.env, **(env or {})}, cwd=self.root,
                              capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"mlcbuild {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def launch(self, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Like ``mlcbuild`` but through the console script's entry (``python -m mlcbuild``),
        which answers a no-op ``run`` from the run journal."""
        return self.mlcbuild(*args, env=env, check=check, entry="mlcbuild")

    def run_json(self, *args: str, env: dict | None = None, check: bool = True) -> list[dict]:
        proc = self.mlcbuild("run", "toy.yaml", "--json", *args, env=env, check=check)
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("alpha\nbeta\n")
    (tmp_path / "src" / "b.txt").write_text("gamma\n")
    (tmp_path / "toy.yaml").write_text(RECIPE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FAKE_", "MLCBUILD_"))}
    env.update(
        MLCBUILD_CACHE_DIR=str(tmp_path / "cache"),
        MLCBUILD_STAGE_PLUGINS="fake_stages",
        PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        FAKE_STAGE_LOG=str(tmp_path / "ran.log"),
    )
    return Workspace(tmp_path, env)
