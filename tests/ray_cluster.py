"""A real Ray cluster on this machine for tests and benchmarks: a head node and worker nodes,
each a `ray start --block` process in its own process group, stopped by signalling those groups
(never `ray stop`, which would stop every Ray process of this user on the machine). A driver
connecting to it needs ``driver_env`` in its environment (the cluster's auth token)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def client_server_port() -> list[str]:
    """A free port for the Ray Client server where ``ray[client]`` (grpc) is installed, so that it
    does not take the fixed 10001; nothing where it is not (`ray start` then refuses the flag)."""
    return [f"--ray-client-server-port={free_port()}"] if importlib.util.find_spec("grpc") else []


class LocalRayCluster:
    """``start_head``, then ``add_worker`` for each worker node; ``nodes()`` lists them;
    ``stop()`` ends every process the cluster started."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        # Short: Ray puts Unix sockets under it, whose paths may not exceed 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        # Token authentication with a token of its own: whatever ~/.ray holds (a local `ray.init()`
        # writes a token there), nodes and drivers given ``driver_env`` agree on it.
        token = self.root / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.driver_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0"}
        self.env = {**(env if env is not None else os.environ), **self.driver_env}
        self.procs: list[subprocess.Popen] = []
        self.address = ""

    def _start(self, args: list[str], log_name: str, env: dict[str, str] | None) -> subprocess.Popen:
        log = open(self.root / log_name, "w")
        proc = subprocess.Popen([*RAY, "start", "--block", "--disable-usage-stats", "--object-store-memory=100000000",
                                 "--node-ip-address=127.0.0.1", *args], env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (self.root / log_name).read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                # Read the log before stop() removes the directory it is in.
                why = "exited" if proc.poll() is not None else "did not start within 120 s"
                tail = (self.root / log_name).read_text()[-6000:]
                self.stop()
                raise RuntimeError(f"ray start ({log_name}) {why}:\n{tail}")
            time.sleep(0.2)
        return proc

    def start_head(self, num_cpus: int, resources: dict[str, float] | None = None,
                   env: dict[str, str] | None = None) -> str:
        port = free_port()
        self._start(["--head", f"--port={port}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources or {})}",
                     f"--temp-dir={self.root}", "--include-dashboard=false", f"--dashboard-port={free_port()}",
                     *client_server_port()], "head.log", env)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None,
                   env: dict[str, str] | None = None) -> None:
        self._start([f"--address={self.address}", f"--num-cpus={num_cpus}",
                     f"--resources={json.dumps(resources or {})}"], f"worker{len(self.procs)}.log", env)

    def nodes(self, expect: int) -> list[dict]:
        """The cluster's live nodes (NodeID, Resources, ...) once ``expect`` of them have joined."""
        code = ("import json, sys, time, ray\n"
                "ray.init(address=sys.argv[1], logging_level='error', log_to_driver=False)\n"
                "deadline = time.time() + 60\n"
                "while len(nodes := [n for n in ray.nodes() if n['Alive']]) < int(sys.argv[2]) and time.time() < deadline:\n"
                "    time.sleep(0.2)\n"
                "print(json.dumps(nodes))\n")
        done = subprocess.run([sys.executable, "-c", code, self.address, str(expect)], env=self.env,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        nodes = json.loads(done.stdout.strip().splitlines()[-1])
        if len(nodes) < expect:
            raise RuntimeError(f"only {len(nodes)} of {expect} Ray nodes joined")
        return nodes

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops what it started), then SIGKILL whatever is
        left in its process group (workers whose raylet went first)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)
