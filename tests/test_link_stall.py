"""A ring link survives a receiver that cannot run for a while: a hypothesis for StreamEOF, ruled out.

py-libp2p 0.8.1's yamux writer fails a write after waiting 5 s for window credit (the stream is then
reset at the writer, and its peer reads EOF). Prefill chunks (295 KB for SmolLM2, 1 MiB at hidden
2048) exceed yamux's initial 256 KiB window, so a member starved of CPU for 5 s looked like a way to
break a ring with both peers alive. It is not: 0.8.1's auto-tuning has grown the window to 16 MiB by
the time the link carries data (credit goes back during protocol negotiation), and a process that
does not run does not drain its socket either, so the writer waits in TCP, which has no timeout.
The 5 s limit bites only if a receiver's process runs but its stream reader does not read 16 MiB
for 5 s, which the framed stream's pump (net/streams.py) rules out. net/tuning.py's writer waits on
the credit itself for up to 60 s anyway. This test keeps both stacks honest about it.

Both ends are real processes on 127.0.0.1 with our host (Noise, admission, yamux) and Linker over
net/streams.py: as the receiver's handler gets the new link, its event loop stalls for STALL_S
seconds (time.sleep in the loop thread: nothing of it runs, as under starvation), then it reads on;
the sender pushes BURST prefill-sized frames at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trio

ROOT = Path(__file__).resolve().parents[1]
STALL_S = 7.0
BURST = 20  # 20 x 295 KB = 5.9 MB: beyond 0.8.1's 256 KiB window and beyond our 4 MiB one
CHUNK = (128, 576)  # a SmolLM2 prefill chunk


def _host():
    import multiaddr

    from benchmarks.link import SECRET
    from p2pinfer.identity import Identity
    from p2pinfer.net.host import build_host

    me = Identity(os.urandom(32))
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    return me, build_host(me.key_pair, SECRET, listen), listen


def _streams(host):
    from p2pinfer.net.keeper import Keeper
    from p2pinfer.net.streams import Streams

    return Streams(Keeper(host))


async def _receiver() -> None:
    from p2pinfer.serve.links import LinkClosed, Linker

    me, host, listen = _host()
    done = trio.Event()

    async def handle(link) -> None:
        got, why = 0, "complete"
        # The link's pump has not read a byte yet (it starts when this handler first waits), so no
        # window credit has gone back: the sender has yamux's initial 256 KiB. Now the whole process
        # stops running trio tasks, as a peer starved of CPU does.
        time.sleep(STALL_S)
        try:
            await link.recv()  # the "data" frame
            while got < BURST:
                frame = await link.recv()
                assert frame.tensor is not None and frame.tensor.shape == CHUNK
                got += 1
        except LinkClosed as e:
            why = str(e)
        print(json.dumps({"received": got, "end": why}), flush=True)
        with trio.move_on_after(2):
            try:
                await link.send({"t": "done", "n": got})
            except LinkClosed:
                pass
        done.set()

    Linker(_streams(host), str(me.peer_id), handle)
    async with host.run(listen):
        print(
            f"{host.get_addrs()[0]}/p2p/{me.peer_id}".replace(f"/p2p/{me.peer_id}/p2p/", "/p2p/"), flush=True
        )
        with trio.move_on_after(60):
            await done.wait()


async def _sender(addr: str) -> None:
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.serve.links import LinkClosed, Linker

    me, host, listen = _host()

    async def refuse(link) -> None:
        return None

    linker = Linker(_streams(host), str(me.peer_id), refuse)
    info = parse_peer_addr(addr)
    chunk = np.ones(CHUNK, np.float32)
    sent, end = 0, "complete"
    async with host.run(listen):
        await host.connect(info)
        t0 = time.monotonic()
        try:
            async with linker.open(str(info.peer_id)) as link:
                await link.send({"t": "data"})
                for _ in range(BURST):
                    await link.send({"t": "h", "last": False}, chunk)
                    sent += 1
                reply = await link.recv()
                assert reply.header == {"t": "done", "n": BURST}
        except LinkClosed as e:
            end = str(e)
        print(json.dumps({"sent": sent, "end": end, "s": round(time.monotonic() - t0, 1)}), flush=True)


def _run(tuned: bool) -> tuple[dict, dict]:
    env = {**os.environ, "P2PINFER_LIBP2P_TUNING": "1" if tuned else "0", "PYTHONPATH": str(ROOT)}
    code = "import sys, trio; from tests import test_link_stall as t; trio.run(t._{}, *sys.argv[1:])"
    receiver = subprocess.Popen([sys.executable, "-c", code.format("receiver")], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        addr = receiver.stdout.readline().strip()
        assert addr, receiver.stderr.read()
        sender = subprocess.run([sys.executable, "-c", code.format("sender"), addr], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=90)  # fmt: skip
        assert sender.returncode == 0, sender.stderr[-3000:]
        got = receiver.stdout.readline()
        assert got, receiver.stderr.read()[-3000:]
        return json.loads(sender.stdout.strip().splitlines()[-1]), json.loads(got)
    finally:
        receiver.kill()
        receiver.wait()


@pytest.mark.parametrize("tuned", [False, True], ids=["unpatched", "tuned"])
def test_link_waits_for_a_stalled_receiver(tuned):
    sender, receiver = _run(tuned)
    assert sender == {"sent": BURST, "end": "complete", "s": sender["s"]} and sender["s"] >= STALL_S - 1
    assert receiver == {"received": BURST, "end": "complete"}
