"""Agent core with real agents in separate processes talking libp2p on 127.0.0.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.harness import new_secret, wait_for

TTL = 3.0


def test_three_agents_chained_by_bootstrap_see_each_other(agents):
    secret = new_secret()
    a = agents("a", secret_hex=secret)
    a.wait_ready()
    b = agents("b", "--bootstrap", a.addr, secret_hex=secret)
    b.wait_ready()
    c = agents("c", "--bootstrap", b.addr, secret_hex=secret)  # c is told only of b
    c.wait_ready()
    ids = {a.peer_id, b.peer_id, c.peer_id}
    start = time.monotonic()
    for x in (a, b, c):
        wait_for(lambda x=x: x.view() == ids, 10, what=f"{x.name} to list all three")
    assert time.monotonic() - start < 10
    # c learned a from gossip and dialled it: the mesh fills in
    wait_for(
        lambda: next(p for p in c.get("/v1/cluster")["peers"] if p["peer_id"] == a.peer_id)["connected"],
        10,
        what="c connected to a",
    )


def test_wrong_secret_agent_is_refused_and_never_seen(agents):
    secret = new_secret()
    a = agents("a", secret_hex=secret)
    a.wait_ready()
    b = agents("b", "--bootstrap", a.addr, secret_hex=secret)
    b.wait_ready()
    intruder = agents("x", "--bootstrap", a.addr, "--bootstrap", b.addr, secret_hex=new_secret())
    intruder.wait_ready()
    x_id = intruder.peer_id
    wait_for(lambda: a.view() == {a.peer_id, b.peer_id} == b.view(), 10, what="a and b to see each other")
    wait_for(lambda: f"refused peer {x_id}" in a.log(), 10, what="a's log line refusing the intruder")
    assert "wrong cluster secret" in a.log()
    time.sleep(3)  # an absence is checked over a window: let the intruder's redials try too
    for member in (a, b):
        cluster = member.get("/v1/cluster")
        assert x_id not in {p["peer_id"] for p in cluster["peers"]}
    assert intruder.view() == {x_id}
    # its connection was closed: the intruder holds no connection to anyone
    assert all(not p["connected"] for p in intruder.get("/v1/cluster")["peers"])


def test_killed_agent_expires_and_terminated_agent_leaves(agents):
    secret = new_secret()
    ttl = ["--peer-ttl", str(TTL)]
    a = agents("a", *ttl, secret_hex=secret)
    a.wait_ready()
    b = agents("b", "--bootstrap", a.addr, *ttl, secret_hex=secret)
    c = agents("c", "--bootstrap", a.addr, *ttl, secret_hex=secret)
    b.wait_ready(), c.wait_ready()
    b_id, c_id = b.peer_id, c.peer_id
    wait_for(lambda: a.view() == {a.peer_id, b_id, c_id}, 10, what="a to see b and c")

    b.signal(signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: b_id not in a.view(), TTL + 2, what="killed b to expire from a's view")
    assert time.monotonic() - t0 <= TTL + 2

    c.signal(signal.SIGTERM)
    t0 = time.monotonic()
    wait_for(lambda: c_id not in a.view(), 2, what="terminated c to leave a's view")
    assert c.proc.wait(10) == 0
    assert "Traceback" not in c.log()
    assert "left the cluster" in a.log()


def test_restart_keeps_peer_id_and_join_token_admits_fresh_agent(agents, tmp_path):
    a = agents("a")  # creates its own secret
    a.wait_ready()
    first_id = a.peer_id
    assert a.stop() == 0
    a.start()
    a.wait_ready()
    assert a.peer_id == first_id
    out = subprocess.run(
        [sys.executable, "-m", "p2pinfer", "id", "--data-dir", str(a.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == first_id

    token = subprocess.run(
        [sys.executable, "-m", "p2pinfer", "invite", "--data-dir", str(a.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    fresh = agents("fresh", "--join", token)
    fresh.wait_ready()
    wait_for(lambda: fresh.view() == {first_id, fresh.peer_id} == a.view(), 10, what="joined via token")
    # the learned secret is kept: a restart without --join stays in the cluster
    assert (fresh.data_dir / "cluster.secret").read_text().strip() == (
        a.data_dir / "cluster.secret"
    ).read_text().strip()


def test_startup_mistakes_exit_nonzero_with_one_sentence(tmp_path):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "p2pinfer", "run", "--data-dir", str(tmp_path / "d"), "--no-mdns", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    cases = {
        "missing secret": (
            ["--cluster-secret-file", str(tmp_path / "nope")],
            "cannot read the cluster secret",
        ),
        "bad secret": (["--cluster-secret-file", __file__], "must be 64 hex characters"),
        "bad size": (["--memory-limit", "lots"], "not a size"),
        "open door": (["--http-host", "0.0.0.0"], "--api-key-file"),
        "bad token": (["--join", "p2pinfer1:!!!"], "join token is corrupt"),
        "bad listen": (["--listen", "/ip4/1.2.3/tcp/1"], "--listen"),
    }
    for name, (args, message) in cases.items():
        r = run(*args)
        assert r.returncode != 0, name
        assert message in r.stderr, (name, r.stderr)
        assert "Traceback" not in r.stderr, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, (name, r.stderr)


def test_busy_http_port_is_one_clear_sentence(agents, tmp_path):
    a = agents("a")
    a.wait_ready()
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "p2pinfer",
            "run",
            "--data-dir",
            str(tmp_path / "d2"),
            "--no-mdns",
            "--http-port",
            str(a.http_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert f"cannot serve HTTP on 127.0.0.1:{a.http_port}" in r.stderr
    assert "Traceback" not in r.stderr


def test_unparsable_bootstrap_is_logged_and_agent_runs(agents):
    a = agents("a", "--bootstrap", "not-an-addr", "--bootstrap", "/ip4/127.0.0.1/tcp/9")
    a.wait_ready()
    assert "ignoring bootstrap address" in a.log()
    assert "lacks /p2p/<peer id>" in a.log()


def test_restarted_agent_rejoins_and_old_gossip_is_not_a_warning(agents):
    """After a restart, gossip from before it comes round again (relays, IHAVE/IWANT): it is dropped
    quietly, and the restarted agent is back in every view through its new record."""
    secret = new_secret()
    ttl = ["--peer-ttl", str(TTL)]
    a = agents("a", "--no-compute", *ttl, secret_hex=secret)
    a.wait_ready()
    b = agents("b", "--no-compute", "--bootstrap", a.addr, *ttl, secret_hex=secret)
    c = agents("c", "--no-compute", "--bootstrap", a.addr, *ttl, secret_hex=secret)
    b.wait_ready(), c.wait_ready()
    ids = {a.peer_id, b.peer_id, c.peer_id}
    for x in (a, b, c):
        wait_for(lambda x=x: x.view() == ids, 15, what=f"{x.name} to list all three")
    b.signal(signal.SIGKILL)
    b.proc.wait(10)
    b.start()  # same key, same port where free: its old messages are still in the others' caches
    b.wait_ready()
    for x in (a, b, c):
        wait_for(lambda x=x: x.view() == ids, 20, what=f"{x.name} to list all three after b's restart")
    for x in (a, b, c):
        assert "dropped gossip record" not in x.log(), x.log()  # stale gossip is DEBUG, not WARNING
        assert "WARNING p2pinfer.membership" not in x.log(), x.log()
        assert "Traceback" not in x.log()
