"""Builder processes: where the local backend builds a stage that cannot share its process.

A stage that is not thread-safe (``Stage.thread_safe = False``: TVM keeps process-global builder
state) cannot run beside another of its kind on a thread of this process. Rather than let such
nodes wait for each other (a build for six devices compiled one library at a time, on one core),
the local backend hands the second and later concurrent ones to builder processes: long-lived
children, one node at a time each, reused for the rest of the run, as Bazel hands actions to
persistent workers. They build into the same artifact store (whose publishing is safe across
processes: it is shared by concurrent CI jobs already).

Protocol (pickled messages over two pipes of their own, so whatever a stage prints goes to stderr
and cannot corrupt it): the parent sends ``("preload", sys.path, modules)`` (import them; no answer:
``LocalBackend.warm`` starts builders that way before the run needs them) or ``("build", sys.path,
job, pickled stage, store root)``, which the child answers with any number of ``("event", kind, fields)`` (the node's logs, progress and warnings)
and then one ``("done", record)`` or ``("error", exception, traceback text)``, or at once
``("unloadable", why)`` when it cannot unpickle the stage. EOF on its input
ends the child. A child that dies mid-node fails that node only (``BuilderDied``); the next node
gets a fresh process.

Run as ``python -m mlcbuild.pipeline.builder_process READ_FD WRITE_FD PARENT_PID`` (by
``BuilderProcess``); it exits when its parent is gone, even mid-node.
"""

from __future__ import annotations

import importlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from mlcbuild.cache.store import ArtifactStore, NodeRecord
from mlcbuild.toolchain import BUILDER_PROCESS_ENV


class BuilderDied(RuntimeError):
    """The builder process exited while building a node (killed, out of memory, a crash in native code)."""


class StageNotLoadable(RuntimeError):
    """The builder could not unpickle the stage (its class is not importable there, e.g. defined in
    the parent's ``__main__``): nothing was built; build it in the parent instead."""


class BuilderProcess:
    """One child process that builds nodes sent to it, one at a time."""

    def __init__(self) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env[BUILDER_PROCESS_ENV] = "1"
        # The child must import this package as this process does, installed or not.
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlcbuild.pipeline.builder_process", str(to_child_r), str(from_child_w),
                 str(os.getpid())],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._send = Connection(to_child_w, readable=False)
        self._recv = Connection(from_child_r, writable=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def preload(self, modules: list[str]) -> None:
        """Have the child import ``modules`` now (no answer; a later build waits behind it)."""
        try:
            self._send.send(("preload", list(sys.path), modules))
        except OSError:
            pass  # a head start only: a dead child is found by the next build

    def build(self, job: Any, stage: Any, store_root: Path, emit: Any) -> NodeRecord:
        """Build ``job`` with ``stage`` into the store at ``store_root``; ``emit(kind, fields)``
        relays the node's events. Raises what the stage raised, or ``BuilderDied``."""
        try:
            self._send.send(("build", list(sys.path), job, pickle.dumps(stage), str(store_root)))
            while True:
                message = self._recv.recv()
                if message[0] == "event":
                    emit(message[1], message[2])
                elif message[0] == "done":
                    return message[1]
                elif message[0] == "unloadable":
                    raise StageNotLoadable(f"builder process {self.pid} cannot load stage {job.stage!r}: {message[1]}")
                else:
                    _, exc, trace = message
                    exc.add_note(f"(in builder process {self.pid})\n{trace}")
                    raise exc
        except (EOFError, BrokenPipeError, ConnectionResetError):
            code = self.proc.wait()
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            raise BuilderDied(f"the builder process (pid {self.pid}) building {job.label} died ({how})") from None

    def close(self) -> None:
        """Ask the child to exit (EOF on its input); kill it if it does not within a few seconds."""
        for conn in (self._send, self._recv):
            try:
                conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class BuilderPool:
    """Up to ``size`` builder processes, started when first needed and reused until ``close``
    (after which the next ``take`` starts them again)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: list[BuilderProcess] = []
        self._started = 0
        self._lock = threading.Lock()

    def take(self) -> BuilderProcess | None:
        """An idle builder, a new one if fewer than ``size`` exist, else None (all busy)."""
        with self._lock:
            while self._idle:
                builder = self._idle.pop()
                if builder.alive():
                    return builder
                builder.close()
                self._started -= 1
        return self._start()

    def prestart(self, count: int, modules: list[str]) -> None:
        """Start up to ``count`` more builders now (within ``size``), each importing ``modules``:
        a run's first concurrent nodes then find them ready (TVM imported) instead of waiting."""
        for _ in range(count):
            builder = self._start()
            if builder is None:
                return
            builder.preload(modules)
            with self._lock:
                self._idle.append(builder)

    def _start(self) -> BuilderProcess | None:
        """A new builder if fewer than ``size`` exist, else None."""
        with self._lock:
            if self._started >= self.size:
                return None
            self._started += 1
        try:
            return BuilderProcess()
        except BaseException:
            with self._lock:
                self._started -= 1
            raise

    def give_back(self, builder: BuilderProcess) -> None:
        with self._lock:
            if builder.alive():
                self._idle.append(builder)
                return
            self._started -= 1
        builder.close()

    def close(self) -> None:
        """End the idle builders. Called when nothing is building (the executor does, after a run)."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._started -= len(idle)
        for builder in idle:
            builder.close()


def _serve(read_fd: int, write_fd: int) -> int:
    from mlcbuild.pipeline.backend import build_node

    incoming = Connection(read_fd, writable=False)
    outgoing = Connection(write_fd, readable=False)
    send_lock = threading.Lock()  # a stage may report from threads of its own

    def send(message: tuple) -> None:
        with send_lock:
            outgoing.send(message)

    while True:
        try:
            kind, path, *message = incoming.recv()
        except EOFError:
            return 0
        sys.path.extend(p for p in path if p not in sys.path)  # where the parent found the stage's module
        if kind == "preload":
            for module in message[0]:
                try:
                    importlib.import_module(module)
                except Exception:  # noqa: BLE001 - a head start only: the node that needs it reports it
                    pass
            continue
        job, stage_bytes, store_root = message
        try:
            stage = pickle.loads(stage_bytes)
        except Exception as exc:  # noqa: BLE001 - e.g. a stage class defined in the parent's __main__
            send(("unloadable", f"{type(exc).__name__}: {exc}"))
            continue
        try:
            record = build_node(job, ArtifactStore(Path(store_root)), stage,
                                lambda kind, fields: send(("event", kind, fields)))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the parent
            send(("error", _picklable(exc), "".join(traceback.format_exception(exc))))
            continue
        send(("done", record))


def _picklable(exc: Exception) -> Exception:
    """``exc`` if it survives a pickle round trip (custom constructors may not), else a
    RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc.with_traceback(None)
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _exit_with_parent(parent: int, interval_s: float = 0.5) -> None:
    """End this process as soon as the one that started it is gone (killed, crashed): EOF on the
    input pipe tells the same, but only once the node being built is done, which can be minutes
    of a CPU nobody wants any more."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        os._exit(1)

    threading.Thread(target=watch, name="mlcbuild-parent-watch", daemon=True).start()


def main(argv: list[str]) -> int:
    read_fd, write_fd, parent = int(argv[1]), int(argv[2]), int(argv[3])
    _exit_with_parent(parent)
    os.dup2(2, 1)  # what stage code prints goes to stderr: the protocol has pipes of its own
    os.environ[BUILDER_PROCESS_ENV] = "1"
    return _serve(read_fd, write_fd)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
