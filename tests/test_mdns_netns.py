"""mDNS discovery between real agents in two network namespaces joined by a veth pair.

The namespaces hold only `lo` and one end of the veth each, on a private 10.213.X.0/24 subnet with a
224.0.0.0/4 route on the veth: multicast from these agents never leaves the pair, and no agent with
mDNS on ever runs in the root namespace. Every namespace and link is deleted in a finalizer, after the
agents in it are stopped. Needs root and iproute2; skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.harness import AgentProcess, new_secret, wait_for

pytestmark = pytest.mark.netns

DISCOVERY_S = 15.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


class NetnsAgent(AgentProcess):
    """An agent run with `ip netns exec` (which execs, so the Popen pid is the agent itself)."""

    def __init__(self, workdir, ns: str, name: str, *args: str, **kw) -> None:
        super().__init__(workdir, name, *args, **kw)
        self.ns = ns

    def command(self) -> list[str]:
        return [
            "ip", "netns", "exec", self.ns,
            sys.executable, "-m", "p2pinfer", "run",
            "--data-dir", str(self.data_dir),
            "--listen", "/ip4/0.0.0.0/tcp/0",
            "--http-host", "127.0.0.1",
            "--http-port", str(self.http_port),
            *self.args,
        ]  # fmt: skip

    def get(self, path: str, timeout: float = 5.0) -> dict:
        # the agent's loopback is the namespace's own: ask from inside it
        code = (
            "import sys, urllib.request; "
            f"sys.stdout.write(urllib.request.urlopen({self.url + path!r}, timeout={timeout}).read().decode())"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", self.ns, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
        )
        if out.returncode != 0:
            raise OSError(f"GET {path} in {self.ns} failed: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.stdout)


@pytest.fixture
def veth_pair(request):
    """Two fresh namespaces joined by a veth pair; yields [(ns, ip), (ns, ip)]."""
    if os.geteuid() != 0:
        pytest.skip("netns test needs root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("netns test needs iproute2's `ip`")
    tag = f"{os.getpid() % 100000}{int(time.monotonic() * 1000) % 1000:03d}"
    subnet = f"10.213.{os.getpid() % 250}"
    ends = [(f"p2pi-a{tag}", f"p2va{tag}", f"{subnet}.1"), (f"p2pi-b{tag}", f"p2vb{tag}", f"{subnet}.2")]

    def cleanup():
        for ns, veth, _ in ends:
            # our agents are stopped by now (the agents fixture finalizes first); anything left in
            # the namespace was started by this test
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
            _ip("link", "del", veth, check=False)  # only if it was left in the root namespace

    request.addfinalizer(cleanup)
    try:
        for ns, _, _ in ends:
            _ip("netns", "add", ns)
        (ns_a, veth_a, _), (ns_b, veth_b, _) = ends
        _ip("link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
        for ns, veth, addr in ends:
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", veth)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        detail = getattr(e, "stderr", "") or ""
        pytest.skip(f"cannot create network namespaces and a veth pair: {' '.join(e.cmd)}: {detail.strip()}")

    # zeroconf binds to the interfaces it sees at start: wait for the carrier and the address first
    def link_ready(ns: str, veth: str) -> bool:
        return "LOWER_UP" in _ip("-n", ns, "link", "show", veth).stdout

    for ns, veth, _ in ends:
        wait_for(lambda ns=ns, veth=veth: link_ready(ns, veth), 5, what=f"{veth} up in {ns}")
    return [(ns, addr) for ns, _, addr in ends]


@pytest.fixture
def ns_agents(tmp_path):
    started: list[NetnsAgent] = []

    def start(ns: str, name: str, *args: str, **kw) -> NetnsAgent:
        a = NetnsAgent(tmp_path, ns, name, *args, **kw).start()
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


def test_mdns_finds_the_peer_across_a_veth_and_skips_other_clusters(veth_pair, ns_agents):
    (ns_a, ip_a), (ns_b, ip_b) = veth_pair
    secret = new_secret()
    a = ns_agents(ns_a, "a", secret_hex=secret)
    b = ns_agents(ns_b, "b", secret_hex=secret)
    # a third agent on the same LAN (beside a, on the same veth) holding another secret
    x = ns_agents(ns_a, "x", secret_hex=new_secret())
    for agent in (a, b, x):
        agent.wait_ready()
    a_id, b_id, x_id = a.peer_id, b.peer_id, x.peer_id
    assert any(f"/ip4/{ip_a}/" in addr for addr in a.get("/health")["listen_addrs"])
    assert any(f"/ip4/{ip_b}/" in addr for addr in b.get("/health")["listen_addrs"])

    t0 = time.monotonic()
    for agent in (a, b):
        try:
            wait_for(lambda agent=agent: agent.view() == {a_id, b_id}, DISCOVERY_S, interval=0.3)
        except AssertionError as e:
            raise AssertionError(
                f"{agent.name} did not list a and b via mDNS: {e}\n{agent.log()[-3000:]}"
            ) from None
    found_s = time.monotonic() - t0
    for agent in (a, b):  # logged once zeroconf's probing is done, possibly after the peer saw us
        wait_for(lambda agent=agent: "mDNS: announcing" in agent.log(), 5, what=f"{agent.name} mDNS up")
    # they found each other on the veth, not by any bootstrap: the link is up between them
    wait_for(
        lambda: next(p for p in a.get("/v1/cluster")["peers"] if p["peer_id"] == b_id)["connected"],
        5,
        what="a connected to b",
    )

    # the other cluster's agent announces too, but its tag differs: it is never dialled nor seen
    time.sleep(3)
    for agent in (a, b):
        assert x_id not in agent.view()
    assert x.view() == {x_id}
    assert all(not p["connected"] for p in x.get("/v1/cluster")["peers"])
    for agent in (a, b, x):
        assert "Traceback" not in agent.log()
    print(f"mDNS discovery across the veth took {found_s:.1f} s")
