"""What each tensor-parallel shard runs, inside a TVM disco worker; and the CPU all-reduce between shards.

A sharded bundle's library is one shard's model whose row-parallel projections call
``runtime.disco.allreduce`` (``models/sharding.py``). TVM's disco dispatches that to
``runtime.disco.<ccl>.allreduce``, ``<ccl>`` being the collective library the worker was initialized
with. Only C++ can set that name (NCCL's ``init_ccl_per_worker`` does), and TVM ships no CPU
collective library; a worker whose CCL was never initialized has the empty name, so its lookup is
``runtime.disco..allreduce``. That is where this module registers its CPU all-reduce: it fills the
slot TVM leaves for sessions without a CCL, and never shadows NCCL or RCCL.

The all-reduce is a star over Unix sockets: every shard sends its float32 partial sums to shard 0,
which adds them in rank order (so every shard gets bit-identical results) and sends the sum back.
Shard 0 is a thread of the engine's process (TVM's ProcessSession keeps worker 0 in the controller);
shards 1.. are processes running this module (``python -m mlcbuild.runtime.tp_worker``, TVM's worker
main). An exception on worker 0's thread would terminate the engine's process (TVM does not catch
it there), so worker 0 never raises: it records the error in :data:`STATE` and skips the remaining
collectives of the step; the controller (``sharded_model``) reads it after the step and raises. A
failing worker process exits, which shard 0 sees as end-of-file on its socket.

Imports the TVM runtime and numpy only (never the compiler).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import tvm_ffi

# Per disco worker thread: its VM, weights, KV cache and last result/error. The engine's process holds
# the worker-0 threads of its sharded models (one each); a worker process holds its own worker.
STATE: dict[int, dict[str, Any]] = {}
# Worker 0's state by the model's socket address: where the controller reads results and errors.
BY_ADDRESS: dict[str, dict[str, Any]] = {}
# Listening sockets shard 0 accepts the others on, by address (made by the controller before the
# session starts, so a worker never connects before it exists).
LISTENERS: dict[str, socket.socket] = {}
PEER_TIMEOUT_S = float(os.environ.get("MLCBUILD_TP_TIMEOUT", "600"))


def _rank() -> int:
    return int(tvm_ffi.get_global_func("runtime.disco.worker_rank")())


def _state() -> dict[str, Any]:
    """This disco worker's state (keyed by its thread: each session has its own worker threads)."""
    return STATE.setdefault(threading.get_ident(), {})


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited (without reaping it: that stays the process pool's job)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _recv_exact(sock: socket.socket, nbytes: int) -> bytes:
    view = bytearray(nbytes)
    got = 0
    while got < nbytes:
        n = sock.recv_into(memoryview(view)[got:])
        if n == 0:
            raise ConnectionError("a tensor-parallel worker went away (its connection closed)")
        got += n
    return bytes(view)


class Communicator:
    """Shard ``rank``'s end of the star: shard 0 holds a socket per other shard, the others one to 0."""

    def __init__(self, rank: int, shards: int, address: str, worker_pids: list[int] = ()):
        """``worker_pids`` (shard 0): the other shards' processes; one that exits before it connects is an
        error at once, not a wait of ``PEER_TIMEOUT_S``."""
        self.rank, self.shards = rank, shards
        self.broken: str | None = None
        self.peers: list[socket.socket] = []
        if rank == 0:
            listener = LISTENERS.pop(address)
            listener.settimeout(0.2)
            deadline = time.monotonic() + PEER_TIMEOUT_S
            by_rank: dict[int, socket.socket] = {}
            while len(by_rank) < shards - 1:
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    for pid in worker_pids:
                        if _exited(pid):
                            raise ConnectionError(f"tensor-parallel worker process {pid} exited before it "
                                                  "connected") from None
                    if time.monotonic() > deadline:
                        raise
                    continue
                conn.settimeout(PEER_TIMEOUT_S)
                peer = int.from_bytes(_recv_exact(conn, 4), "little")
                by_rank[peer] = conn
            listener.close()
            self.peers = [by_rank[r] for r in range(1, shards)]
        else:
            deadline = time.monotonic() + 60
            while True:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    conn.connect(address)
                    break
                except OSError:
                    conn.close()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            conn.sendall(rank.to_bytes(4, "little"))
            self.peers = [conn]
        for peer in self.peers:
            peer.settimeout(PEER_TIMEOUT_S)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

    def allreduce_sum(self, send: np.ndarray) -> np.ndarray:
        if self.rank != 0:
            self.peers[0].sendall(send.tobytes())
            return np.frombuffer(_recv_exact(self.peers[0], send.nbytes), send.dtype).reshape(send.shape)
        total = np.array(send, copy=True)
        for peer in self.peers:  # in rank order: every shard gets the same bits
            total += np.frombuffer(_recv_exact(peer, send.nbytes), send.dtype).reshape(send.shape)
        payload = total.tobytes()
        for peer in self.peers:
            peer.sendall(payload)
        return total

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


@tvm_ffi.register_global_func("runtime.disco..allreduce", override=True)
def _allreduce(send: Any, kind: Any, in_group: bool, recv: Any) -> None:
    """TVM's all-reduce for a worker without a CCL (see the module docstring): sum only."""
    rank = _rank()
    comm: Communicator = _state()["comm"]
    if comm.broken is not None:  # a dead peer: finish the step without communicating; the step fails
        return
    try:
        if int(kind) != 0:
            raise NotImplementedError(f"the CPU all-reduce implements sum only, not reduce kind {int(kind)}")
        recv.copyfrom(comm.allreduce_sum(send.numpy()))
    except Exception as exc:  # noqa: BLE001  (worker 0 must not raise: see the module docstring)
        comm.broken = f"{type(exc).__name__}: {exc}"
        _fail(rank, comm.broken)


def _fail(rank: int, message: str) -> None:
    """Record an error of this rank's step; a worker process exits (shard 0 sees its socket close)."""
    _state()["error"] = message
    if rank != 0:
        print(f"mlcbuild tensor-parallel worker {rank}: {message}", file=sys.stderr, flush=True)
        os._exit(1)


def _guarded(func: Any) -> Any:
    """Run a worker step; its exception becomes the rank's recorded error, not a raise (see above)."""
    def run(*args: Any) -> None:
        rank = _rank()
        try:
            func(rank, *args)
        except Exception:  # noqa: BLE001
            _fail(rank, traceback.format_exc(limit=4))
    return run


def _load_params(bundle: Path, names: list[str], rank: int, device: Any) -> list[Any]:
    """This rank's weights (its records of the pre-sharded index; only its files are mapped)."""
    import tvm

    index = json.loads((bundle / "params" / "tensor-cache.json").read_text())
    records = {r["name"]: r for r in index["tensors"] if r.get("rank") == rank}
    out = []
    maps: dict[str, np.memmap] = {}
    for name in names:
        rec = records.get(name)
        if rec is None:
            raise KeyError(f"{bundle}: no weight {name!r} for shard {rank}")
        shard = maps.get(rec["shard"])
        if shard is None:
            shard = maps[rec["shard"]] = np.memmap(bundle / "params" / rec["shard"], dtype=np.uint8, mode="r")
        dtype = np.dtype(rec["dtype"]) if rec["dtype"] != "bfloat16" else __import__("ml_dtypes").bfloat16
        raw = shard[rec["offset"]:rec["offset"] + rec["nbytes"]]
        out.append(tvm.runtime.tensor(np.ascontiguousarray(raw.view(dtype).reshape(rec["shape"])), device))
    return out


@tvm_ffi.register_global_func("mlcbuild.tp.init", override=True)
@_guarded
def _init(rank: int, bundle: str, library: str, address: str, shards: int, limits: str) -> None:
    """Connect to the other shards, load the library, this shard's weights and a KV cache."""
    import tvm
    from tvm.runtime import ShapeTuple
    from tvm.runtime.vm import VirtualMachine

    state = _state()
    if rank == 0:
        BY_ADDRESS[address] = state
    lim = json.loads(limits)
    state["comm"] = Communicator(rank, shards, address, lim.get("worker_pids", ()))
    device = tvm.cpu(0)
    vm = VirtualMachine(tvm.runtime.load_module(library), device)
    metadata = json.loads(vm["_metadata"]())
    state.update(vm=vm, device=device, shape=ShapeTuple,
                 params=_load_params(Path(bundle), [p["name"] for p in metadata["params"]], rank, device))
    try:  # speculative verification (libraries built before it verify through batch_prefill)
        state["verify"] = vm["batch_verify"]
    except (AttributeError, KeyError, RuntimeError, ValueError):
        state["verify"] = None
    state["kv"] = vm["create_paged_kv_cache"](
        ShapeTuple([lim["max_batch_size"]]), ShapeTuple([lim["kv_cache_tokens"]]), ShapeTuple([lim["prefill_chunk_size"]]),
        ShapeTuple([lim["page_size"]]), ShapeTuple([1 if lim["sliding_window"] else 0]))
    state["sliding"] = (lim["sliding_window"], lim["attention_sink"])
    g = tvm.get_global_func
    state["fn"] = {name: g(f"vm.builtin.{name}") for name in (
        "kv_state_begin_forward", "kv_state_end_forward", "kv_state_add_sequence", "kv_state_remove_sequence",
        "kv_state_fork_sequence", "kv_state_popn", "attention_kv_cache_get_num_available_pages",
        "attention_kv_cache_enable_sliding_window_for_seq", "reshape")}


@tvm_ffi.register_global_func("mlcbuild.tp.kv", override=True)
@_guarded
def _kv(rank: int, op: str, a: int, b: int, c: int) -> None:
    """A KV-cache bookkeeping call, the same on every shard (each holds its KV heads of every sequence)."""
    state = _state()
    fn, kv = state["fn"], state["kv"]
    window, sink = state["sliding"]
    if op == "add":
        fn["kv_state_add_sequence"](kv, a)
    elif op == "fork":  # c: the fork position (-1: the whole parent)
        fn["kv_state_fork_sequence"](kv, a, b, c)
    elif op == "remove":
        fn["kv_state_remove_sequence"](kv, a)
    elif op == "popn":
        fn["kv_state_popn"](kv, a, b)
    if op in ("add", "fork") and window:
        fn["attention_kv_cache_enable_sliding_window_for_seq"](kv, b if op == "fork" else a, window - 1, sink)
    state["result"] = int(fn["attention_kv_cache_get_num_available_pages"](kv))


@tvm_ffi.register_global_func("mlcbuild.tp.forward", override=True)
@_guarded
def _forward(rank: int, kind: str, seq_ids: Any, lengths: Any, tokens: Any, positions: Any) -> None:
    """One model call on this shard: embed (embeddings are replicated), the shard's layers with their
    all-reduces, logits (replicated LM head). Shard 0 keeps the logits for the controller."""
    import tvm

    state = _state()
    if state["comm"].broken is not None:
        raise ConnectionError(state["comm"].broken)
    fn, kv, vm, params, shape, device = (state[k] for k in ("fn", "kv", "vm", "params", "shape", "device"))
    ids = tvm.runtime.tensor(np.asarray(list(tokens), dtype=np.int32), device)
    embeddings = vm["embed"](ids, params)
    hidden = embeddings.shape[-1]
    n = len(tokens)
    fn["kv_state_begin_forward"](kv, shape(list(seq_ids)), shape(list(lengths)))
    try:
        if kind == "decode":
            embeddings = fn["reshape"](embeddings, shape([n, 1, hidden]))
            logits = vm["batch_decode"](embeddings, kv, params)
        elif kind == "verify" and state.get("verify") is not None:  # every position's logits
            embeddings = fn["reshape"](embeddings, shape([1, n, hidden]))
            logits = state["verify"](embeddings, kv, params)
        else:  # prefill (and verify on libraries built before batch_verify: positions = every token)
            embeddings = fn["reshape"](embeddings, shape([1, n, hidden]))
            at = tvm.runtime.tensor(np.asarray(list(positions), dtype=np.int32), device)
            logits = vm["batch_prefill"](embeddings, at, kv, params)
    finally:
        fn["kv_state_end_forward"](kv)
    if rank == 0:
        out = logits.numpy()
        state["result"] = out[:, 0] if kind == "decode" else out[0]
    if state["comm"].broken is not None:
        raise ConnectionError(state["comm"].broken)


@tvm_ffi.register_global_func("mlcbuild.tp.close", override=True)
def _close() -> None:
    state = STATE.pop(threading.get_ident(), {})
    if "comm" in state:
        state["comm"].close()


# Read ends of the controller-to-worker pipes, kept open in the controller (see create_process_pool).
_KEPT_FDS: list[int] = []
STARTED_PIDS: list[int] = []  # worker processes started in this process, in order


@tvm_ffi.register_global_func("mlcbuild.tp.create_process_pool", override=True)
def create_process_pool(num_workers: int, num_groups: int, entrypoint: str) -> Any:
    """TVM's process pool (``runtime.disco.create_process_pool``), except that the controller keeps the
    read end of each worker's command pipe open: TVM writes every command (and its shutdown, from the
    session's destructor) to every worker, and a write to a dead worker's pipe fails with EPIPE, which
    TVM turns into an exception it does not catch there (the process aborts). With the read end kept,
    a dead worker's commands land in its pipe unread; the step fails at shard 0's all-reduce instead."""
    import subprocess

    from tvm.runtime.disco.process_pool import DiscoPopenWorker

    class Worker(DiscoPopenWorker):
        def start(self) -> Any:
            if self._proc is not None:
                return None, None
            main_read, worker_write = os.pipe()
            worker_read, main_write = os.pipe()
            cmd = [sys.executable, "-m", self.entrypoint, str(self.worker_id), str(self.num_workers),
                   str(self.num_groups), str(worker_read), str(worker_write)]
            self._proc = subprocess.Popen(cmd, pass_fds=(worker_read, worker_write))
            _KEPT_FDS.append(worker_read)
            STARTED_PIDS.append(self._proc.pid)
            os.close(worker_write)
            return main_read, main_write

    pool = [Worker(i, num_workers, num_groups, entrypoint) for i in range(1, num_workers)]

    def result(worker_id: int) -> Any:
        nonlocal pool
        if worker_id != 0:
            read_fd, write_fd = pool[worker_id - 1].start()
            return tvm_ffi.Shape([read_fd, write_fd])
        for worker in pool:  # the session is gone: end its workers
            worker.kill()
        pool = []
        return None

    return result


def main() -> None:
    """A worker process: TVM's disco worker loop, with this module's functions registered."""
    from tvm.exec.disco_worker import main as disco_main

    disco_main()


if __name__ == "__main__":
    try:
        main()
    except (OSError, KeyboardInterrupt):
        pass
