"""Real agents in separate processes on 127.0.0.1, for integration tests and benchmarks."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Poll until predicate() is truthy; return its value, or fail naming what never happened."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, KeyError, StopIteration) as e:  # not listening yet, or not there yet
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_exc})")


# Test agents share one compiled-kernel cache (each would otherwise compile the same kernels in its own
# fresh data dir); tinygrad keys it by kernel source, so a stale entry is never used.
SHARED_KERNEL_CACHE = Path(os.environ.get("P2PINFER_TEST_KERNEL_CACHE", "/tmp/p2pinfer-test-kernels")) / "kernels.db"


class AgentProcess:
    def __init__(self, workdir: Path, name: str, *args: str, secret_hex: str | None = None, env=None):
        self.name = name
        self.data_dir = workdir / name
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.args = list(args)
        if secret_hex is not None:
            secret_file = workdir / f"{name}.secret"
            secret_file.write_text(secret_hex + "\n")
            self.args += ["--cluster-secret-file", str(secret_file)]
        self.env = {"CACHEDB": str(SHARED_KERNEL_CACHE), **os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "p2pinfer", "run",
            "--data-dir", str(self.data_dir),
            "--http-port", str(self.http_port),
            "--listen", "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            *self.args,
        ]  # fmt: skip

    def start(self) -> AgentProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str, timeout: float = 5.0, headers: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_ready(self, timeout: float = 60.0) -> dict:
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            return self.get("/health")

        return wait_for(ready, timeout, what=f"{self.name} /health")

    @property
    def peer_id(self) -> str:
        return self.get("/health")["peer_id"]

    @property
    def addr(self) -> str:
        return self.get("/health")["listen_addrs"][0]

    def view(self) -> set[str]:
        return {p["peer_id"] for p in self.get("/v1/cluster")["peers"]}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def end_child(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Close a helper process's stdin (its signal to stop), then wait for it, killing it if it hangs."""
    proc.stdin.close()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def new_secret() -> str:
    return secrets.token_hex(32)


@contextmanager
def three_peers_and_a_keyed_gateway(work: Path, memory_limit: str, api_key: str,
                                    ready_timeout: float = 60.0) -> Iterator[dict[str, AgentProcess]]:  # fmt: skip
    """Computing peers a, b, c (b and c bootstrapped from a) whose memory limit decides the ring, and a
    --no-compute gateway "gw" that asks for `api_key`; all stopped on exit. The caller waits for the views
    it needs."""
    secret = new_secret()
    started: list[AgentProcess] = []

    def start(name, *args):
        a = AgentProcess(work, name, *args, secret_hex=secret).start()
        started.append(a)
        return a

    try:
        a = start("a", "--memory-limit", memory_limit)
        a.wait_ready(ready_timeout)
        b = start("b", "--memory-limit", memory_limit, "--bootstrap", a.addr)
        c = start("c", "--memory-limit", memory_limit, "--bootstrap", a.addr)
        key_file = work / "api.key"
        key_file.write_text(api_key + "\n")
        gw = start("gw", "--no-compute", "--api-key-file", str(key_file), "--bootstrap", a.addr)
        for x in (b, c):
            x.wait_ready(ready_timeout)
        yield {"a": a, "b": b, "c": c, "gw": gw}
    finally:
        for x in started:
            x.stop()
