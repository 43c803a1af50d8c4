"""A tensor-parallel bundle driven like :class:`~mlcbuild.runtime.engine.CompiledModel`: one TVM disco
worker per shard, each running the shard's library with its own weights and KV heads.

The engine sees the same methods (``add_sequence``, ``fork_sequence``, ``remove_sequence``,
``available_pages``, ``popn``, ``forward_prefill``, ``forward_prefill_at``, ``forward_verify``, ``forward_decode``, ``page_size``,
``total_pages``, ``max_chunk_tokens``): every call is broadcast to all shards (token ids, sequence ids
and lengths travel as shape tuples, so no tensor is copied to the workers), the shards' all-reduces
meet in the compiled model, and shard 0's logits come back for sampling on the engine's side, which
is worker 0's process. What the shards run is :mod:`.tp_worker`.

Workers: TVM's ``ProcessSession`` (worker 0 a thread of this process, the others processes), so that a
worker process that dies is an error of the step in flight (its socket closes under shard 0's
all-reduce, or the next command finds its pipe closed), raised as :class:`TensorParallelError`, and
every later call fails at once: the engine fails the requests in flight instead of hanging. A thread per
worker process waits for its end, so a worker that dies while no step runs marks the model ``failed`` too
(the server's /health and its watchdog read it). A closed model's session, if healthy, is kept and reused
by the next model with as many shards (its workers are not started again).
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import json
import os
import socket
import threading
import time
import weakref
from typing import Any

import numpy as np

from .bundle import Bundle, BundleError

_ADDRESSES = itertools.count()
# Models still open: closed at exit, while Python can still run the session's process-pool callback
# (TVM calls it from the session's destructor; at interpreter teardown that aborts the process).
_OPEN: "weakref.WeakSet[ShardedModel]" = weakref.WeakSet()


# Sessions of closed models, by shard count, whose workers idle in their loops: the next model with as many
# shards takes one instead of starting its worker processes again (each imports TVM, 2-3 s). One is kept
# per shard count, until exit.
_IDLE: dict[int, tuple[Any, list[int]]] = {}


@atexit.register
def _close_all() -> None:
    for model in list(_OPEN):
        model.close()
    while _IDLE:
        _shutdown(*_IDLE.popitem()[1])


def _ended(pid: int) -> str | None:
    """How worker ``pid`` ended ("killed by signal 9", "exit status 1"), or None while it runs. WNOWAIT: it is
    not reaped here (that stays TVM's process pool's job)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return "ended"  # already reaped
    return None if info is None else _how(info)


def _how(info: Any) -> str:
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return f"killed by signal {info.si_status}"
    return f"exit status {info.si_status}"


def _alive(pid: int) -> bool:
    return _ended(pid) is None


def _shutdown(session: Any, pids: list[int]) -> None:
    """End a session for good: its worker-0 thread and worker processes leave their loops, and are killed."""
    try:
        session.shutdown()
    except Exception:  # noqa: BLE001  (a dead worker: nothing to keep)
        pass
    # TVM's session destructor calls back into Python (the process pool) and aborts the process when
    # that happens at interpreter teardown, which is when a reference kept by a traceback would let it
    # run. The session is shut down and its workers are killed here: its object is never destroyed.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(session))
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


class TensorParallelError(RuntimeError):
    """A shard failed (its worker died or raised); the sharded model cannot be used any more."""


def _disco_session_module() -> Any:
    """``tvm.runtime.disco.session`` with its FFI functions bound. TVM 0.27 loads the disco library
    (libtvm_runtime_extra) at the end of ``import tvm``, after ``tvm.runtime`` tried to bind them,
    so ``tvm.runtime.disco`` is None and its ``_ffi_api`` empty until bound again here."""
    import importlib

    import tvm  # noqa: F401  (loads libtvm_runtime_extra)
    import tvm_ffi

    session = importlib.import_module("tvm.runtime.disco.session")
    api = importlib.import_module("tvm.runtime.disco._ffi_api")
    if not hasattr(api, "SessionProcess"):
        tvm_ffi.init_ffi_api("runtime.disco", api.__name__)
    return session


def _watch_worker(model_ref: "weakref.ref[ShardedModel]", rank: int, pid: int) -> None:
    """Wait for worker ``pid`` to end (WNOWAIT: without reaping it, which stays TVM's process pool's job);
    unless its model is being closed, mark the model failed."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # already reaped: its model closed it
        return
    model = model_ref()
    if model is None or model._session is None or model._failed is not None:
        return  # closed (close() kills the workers), or already failed with a more precise message
    model._failed = f"tensor-parallel worker {rank} (pid {pid}) died ({_how(info)})"


class ShardedModel:
    """A bundle built with ``tensor_parallel_shards`` > 1, on CPU, one disco worker per shard."""

    WORKER_MODULE = "mlcbuild.runtime.tp_worker"  # what a worker process runs (python -m)

    def __init__(self, bundle: Bundle, max_batch_size: int, kv_cache_tokens: int, prefill_chunk_size: int,
                 page_size: int):
        from . import tp_worker  # registers worker 0's functions (and the CPU all-reduce) in this process

        self.shards = int(bundle.chat_config.tensor_parallel_shards)
        if bundle.device.kind != "cpu":
            raise BundleError(f"{bundle.path}: tensor-parallel bundles run on CPU here (disco with the CPU "
                              f"all-reduce); {bundle.device} would need NCCL, which this runtime does not start")
        self._worker = tp_worker
        cc = bundle.chat_config
        self.page_size = page_size
        self.sliding_window = cc.sliding_window_size if cc.sliding_window_size and cc.sliding_window_size > 0 else 0
        self.max_chunk_tokens = max(1, min(prefill_chunk_size, self.sliding_window - 1)) if self.sliding_window \
            else prefill_chunk_size
        # One TVM thread pool per shard: the shards share the machine's cores (each worker process
        # reads this at start; shard 0 uses this process's pool, sized by the first model loaded).
        cores = len(os.sched_getaffinity(0))
        os.environ["TVM_NUM_THREADS"] = str(max(1, cores // self.shards))
        self._failed: str | None = None
        self._state: dict[str, Any] = {}  # worker 0's (tp_worker.BY_ADDRESS), once its init ran
        self._address = address = f"\0mlcbuild-tp-{os.getpid()}-{next(_ADDRESSES)}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(self.shards)
        tp_worker.LISTENERS[address] = listener
        idle = _IDLE.pop(self.shards, None)
        if idle is not None and not all(_alive(pid) for pid in idle[1]):
            _shutdown(*idle)  # a worker of the idle session died: it would never join the all-reduce
            idle = None
        if idle is not None:
            self._session, self._pids = idle
        else:
            started = len(tp_worker.STARTED_PIDS)
            session_module = _disco_session_module()
            # TVM's ProcessSession with our process pool (tp_worker.create_process_pool says why)
            self._session = session_module.ProcessSession.__new__(session_module.ProcessSession)
            self._session.__init_handle_by_constructor__(
                session_module._ffi_api.SessionProcess, self.shards, 1, "mlcbuild.tp.create_process_pool",
                self.WORKER_MODULE)
            self._pids = tp_worker.STARTED_PIDS[started:]
        get = self._session.get_global_func
        self._init, self._kv, self._forward, self._close = (get(f"mlcbuild.tp.{n}") for n in ("init", "kv", "forward",
                                                                                                 "close"))
        limits = {"max_batch_size": max_batch_size, "kv_cache_tokens": kv_cache_tokens,
                  "prefill_chunk_size": prefill_chunk_size, "page_size": page_size,
                  "sliding_window": self.sliding_window, "attention_sink": max(cc.attention_sink_size or 0, 0),
                  "worker_pids": self._pids}
        library = bundle.path / (bundle.manifest.library.file if bundle.manifest.library else "lib/model.so")
        self._call(self._init, str(bundle.path), str(library), address, self.shards, json.dumps(limits))
        self._state = tp_worker.BY_ADDRESS[address]
        _OPEN.add(self)
        self.total_pages = self.available_pages()
        # A worker that dies while the engine is idle fails no step: watch the processes, so that the model
        # reads as failed (``failed``: the server's /health and its watchdog) before any request finds out.
        for rank, pid in enumerate(self._pids, start=1):
            threading.Thread(target=_watch_worker, args=(weakref.ref(self), rank, pid), daemon=True,
                             name=f"mlcbuild-tp-watch-{pid}").start()

    # --- one step on every shard ---------------------------------------------------------------------
    def _call(self, func: Any, *args: Any) -> Any:
        """Run ``func`` on every shard and wait for shard 0 (which waits for the rest in its all-reduces)."""
        if self._failed is not None:
            raise TensorParallelError(self._failed)
        self._state.pop("result", None)
        try:
            func(*args)
            self._session.sync_worker_0()
        except Exception as exc:  # noqa: BLE001  (TVM's session itself failed)
            self._fail(f"a tensor-parallel worker is gone ({type(exc).__name__}: {exc})")
        state = self._state or self._worker.BY_ADDRESS.get(self._address, {})
        if "error" in state:
            self._fail(f"tensor-parallel shard failed: {state['error']}")
        return state.get("result")

    def _fail(self, message: str) -> None:
        """Mark the model failed and raise. When a worker process died, the message says which, and how; the
        step's own error is only its symptom (a closed or reset connection at shard 0's all-reduce)."""
        dead = self._dead_worker(wait_s=1.0)
        if dead is not None:
            symptom = message.strip().splitlines()[-1] if message.strip() else ""
            message = f"{dead} (shard 0: {symptom})"
        self._failed = message
        raise TensorParallelError(message)

    def _dead_worker(self, wait_s: float) -> str | None:
        """Which worker process died, if one did; waits up to ``wait_s`` for the kernel to finish one that is
        dying (its sockets close before its exit status can be read)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, pid in enumerate(self._pids, start=1):
                how = _ended(pid)
                if how is not None:
                    return f"tensor-parallel worker {rank} (pid {pid}) died ({how})"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.01)

    @property
    def failed(self) -> str | None:
        """Why this model can no longer run (a worker died or a shard failed), or None while it can."""
        return self._failed

    # --- KV cache --------------------------------------------------------------------------------------
    def available_pages(self) -> int:
        if self._failed is not None:
            # bookkeeping of a failed model must not raise (the engine reads it outside its step's error
            # handling): every page reads as free, so a request is admitted and fails at its first call
            return self.total_pages
        return int(self._call(self._kv, "pages", 0, 0, 0))

    def add_sequence(self, seq_id: int) -> None:
        # on a failed model only the forward calls raise: the engine admits a request (it fails its
        # requests from their model steps; one that failed while being admitted would be lost)
        if self._failed is None:
            self._call(self._kv, "add", seq_id, 0, 0)

    def fork_sequence(self, parent: int, child: int, fork_pos: int = -1) -> None:
        """``child`` shares ``parent``'s first ``fork_pos`` tokens (all of them: -1), on every shard."""
        self._call(self._kv, "fork", parent, child, fork_pos)

    def remove_sequence(self, seq_id: int) -> None:
        if self._failed is None:  # freeing on a failed model: nothing to free (see available_pages)
            self._call(self._kv, "remove", seq_id, 0, 0)

    def popn(self, seq_id: int, n: int) -> None:
        """Drop the last ``n`` tokens of a sequence (rejected speculative tokens), on every shard."""
        if n:
            self._call(self._kv, "popn", seq_id, n, 0)

    # --- forward passes ------------------------------------------------------------------------------------
    def _run(self, kind: str, seq_ids: list[int], lengths: list[int], tokens: list[int], positions: list[int]) -> np.ndarray:
        shape = self._worker_shape
        logits = self._call(self._forward, kind, shape(seq_ids), shape(lengths), shape(tokens), shape(positions))
        return np.asarray(logits, dtype=np.float32)

    @staticmethod
    def _worker_shape(values: list[int]) -> Any:
        from tvm.runtime import ShapeTuple

        return ShapeTuple([int(v) for v in values])

    def forward_prefill(self, seq_ids: list[int], chunks: list[list[int]]) -> np.ndarray:
        """Append each sequence's chunk to the cache; logits [len(seq_ids), vocab] at each chunk's end."""
        ends = (np.cumsum([len(c) for c in chunks]) - 1).tolist()
        return self._run("prefill", seq_ids, [len(c) for c in chunks], [t for c in chunks for t in c], ends)

    def forward_prefill_at(self, seq_id: int, token_ids: list[int], positions: list[int]) -> np.ndarray:
        """One sequence's chunk; logits [len(positions), vocab] at those positions of the chunk."""
        return self._run("prefill", [seq_id], [len(token_ids)], token_ids, positions)

    def forward_verify(self, seq_ids: list[int], chunks: list[list[int]]) -> np.ndarray:
        """Append each sequence's chunk; logits [total tokens, vocab] at every position (speculation)."""
        flat = [t for c in chunks for t in c]
        return self._run("verify", seq_ids, [len(c) for c in chunks], flat, list(range(len(flat))))

    def forward_decode(self, seq_ids: list[int], token_ids: list[int]) -> np.ndarray:
        """One new token per sequence; logits [len(seq_ids), vocab]."""
        return self._run("decode", seq_ids, [1] * len(seq_ids), token_ids, [])

    # --- lifetime --------------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """This model's worker processes (shards 1..N-1; shard 0 is a thread of this process)."""
        return list(self._pids)


    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter teardown)
            pass

    def close(self) -> None:
        """Free this model's workers' state; a healthy session is kept for the next model (see ``_IDLE``)."""
        if getattr(self, "_session", None) is None:
            return
        session, self._session = self._session, None
        _OPEN.discard(self)
        reusable = self._failed is None
        if reusable:
            try:
                session.get_global_func("mlcbuild.tp.close")()
                session.sync_worker_0()
            except Exception:  # noqa: BLE001  (closing after a failure: nothing to keep)
                reusable = False
        self._worker.BY_ADDRESS.pop(self._address, None)
        self._state = {}
        if reusable and self.shards not in _IDLE and all(_alive(pid) for pid in self._pids):
            _IDLE[self.shards] = (session, self._pids)
        else:
            _shutdown(session, self._pids)
