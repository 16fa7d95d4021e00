"""net/tuning.py: pinned to the py-libp2p it was written for, and wire-compatible with peers without it.

Each direction runs a real pair of processes on 127.0.0.1 (benchmarks/link.py's serving peer and its
client, both our libp2p host with admission), one tuned and one not: a 3 MiB echo checked byte for
byte (many yamux frames and window updates each way), bulk data, and ring frames through Linker /
FramedStream (net/streams.py) checked frame by frame.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from p2pinfer.net import tuning
from tests.harness import end_child

LINK = str(Path(__file__).resolve().parents[1] / "benchmarks" / "link.py")


def test_written_for_the_installed_py_libp2p():
    # The adjustments replace 0.8.1 internals; a different version must be re-read before they apply.
    assert tuning.installed_version() == tuning.WRITTEN_FOR == "0.8.1"


def _env(tuned: bool) -> dict:
    return {**os.environ, "P2PINFER_LIBP2P_TUNING": "1" if tuned else "0"}


def _pair(server_tuned: bool, client_tuned: bool) -> tuple[dict, dict]:
    server = subprocess.Popen([sys.executable, LINK, "--serve", "libp2p"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(server_tuned))  # fmt: skip
    try:
        addr = server.stdout.readline().strip()
        assert addr, server.stderr.read()
        server_state = json.loads(server.stdout.readline())
        client = subprocess.run([sys.executable, LINK, "--client", "libp2p", "--addr", addr, "--check",
                                 "--bulk-mb", "8", "--rounds", "50"], capture_output=True, text=True,
                                timeout=120, env=_env(client_tuned))  # fmt: skip
        assert client.returncode == 0, client.stderr[-3000:]
        return server_state, json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        end_child(server)


@pytest.mark.parametrize("server_tuned,client_tuned", [(False, True), (True, False), (True, True)],
                         ids=["unpatched-serves-tuned", "tuned-serves-unpatched", "both-tuned"])  # fmt: skip
def test_wire_compatible_with_unpatched_peer(server_tuned, client_tuned):
    server, client = _pair(server_tuned, client_tuned)
    assert server["tuned"] is server_tuned and client["tuned"] is client_tuned
    assert client["echoed"] == 4  # 4 x 3 MiB echoed and compared
    assert client["bulk"] > 0 and client["rtt8k"] > 0
    assert client["hop"] > 0 and client["hop2k"] > 0  # every ring frame came back equal
    if client_tuned:  # one ring frame sent = one socket write (no per-read window update going back)
        assert client["hop_writes"] < 1.05 and client["hop2k_writes"] < 1.05, client


def test_off_by_environment():
    code = "from p2pinfer.net import tuning; print(tuning.apply(), tuning.is_applied())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(False), check=True
    )
    assert out.stdout.split() == ["False", "False"]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(True), check=True
    )
    assert out.stdout.split() == ["True", "True"]
