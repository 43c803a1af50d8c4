"""Atomic writes from many threads of one process: the race CI hit when two parallel compile
nodes memoized the same host fact through one pid-named temporary file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mlcbuild import toolchain
from mlcbuild.atomicfile import write_atomic

THREADS = 12


def _run_together(target) -> list[BaseException]:
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def body(index: int) -> None:
        barrier.wait()
        try:
            target(index)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_concurrent_writes_to_one_path_all_succeed_and_leave_no_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "facts" / "value"
    for _ in range(20):
        errors = _run_together(lambda i: write_atomic(path, f"value {i}\n" * 4096))
        assert errors == []
        text = path.read_text()
        # Whole, from one writer: never a mix or a truncation.
        assert len(set(text.splitlines())) == 1 and len(text.splitlines()) == 4096
    assert [p.name for p in path.parent.iterdir()] == ["value"]


def test_host_fact_memo_from_parallel_nodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLCBUILD_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def compute() -> str:
        calls.append(1)
        return "17.0.6"

    for round_ in range(10):
        errors = _run_together(lambda i: toolchain.memo(f"clang --version {round_}", compute))
        assert errors == []
        assert toolchain.memo(f"clang --version {round_}", lambda: "recomputed") == "17.0.6"
    assert not list((tmp_path / "cache" / "host-facts").glob("*.tmp"))
    assert not list((tmp_path / "cache" / "host-facts").glob(".*"))
