"""Gossip benchmark: convergence time and steady-state gossip traffic for N = 5, 10, 20 agents.

Real agent processes on 127.0.0.1 (tests/harness.py), mDNS off, --no-compute (no model is loaded:
this measures the agent's own cost, not the engine's). Agents start one after another,
each ready before the next; agent i bootstraps to one random earlier agent, so the full mesh and
every view must come from gossip (records carry addresses, learned peers are dialled).

Convergence: from the moment the last agent's process is started (and, separately, from when its
/health answers) until one sweep over every agent's GET /v1/cluster finds all N peer ids in every
view.

Traffic: after convergence and a settling pause, the bytes on every established TCP socket owned
by each agent's pid are read twice, WINDOW_S apart, with `ss -tinpH` (the kernel's tcp_info
counters `bytes_sent` / `bytes_received`: TCP payload, i.e. everything libp2p writes: Noise-
encrypted yamux frames carrying gossipsub RPCs (records, IHAVE/IWANT, GRAFT/PRUNE, heartbeats);
no IP/TCP headers). Sockets on the agent's HTTP port are left out, so our own polling is not
counted; a socket present at the end but not at the start counts from zero. On loopback every byte
one agent sends another receives, so the mean sent and mean received per agent are equal; we report
sent bytes/s per agent (its gossip upload) and the same per peer in the view (per-agent rate / N),
plus the agent's CPU share (utime+stime from /proc/PID/stat) over the same window.

Views are sampled every second during the window: a view missing anyone there counts as a flap.
Warnings, errors and tracebacks in the agents' logs are counted and the most common are shown.
Expiries: "expired from the view" log lines after convergence, all of live peers (nobody is stopped
until the end). --soak S keeps watching for S more seconds after the window (views every 5 s).

Run: python benchmarks/gossip.py [--sizes 5,10,20] [--window 10] [--soak 300] (4-5 min on 2 cores
without the soak).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import AgentProcess, new_secret  # noqa: E402

SETTLE_S = 5.0
CONVERGE_TIMEOUT_S = 90.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def socket_bytes(pids: set[int]) -> dict[tuple, tuple[int, int]]:
    """(pid, local, peer) -> (bytes_sent, bytes_received) for every established TCP socket of pids."""
    out = subprocess.run(
        ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, check=True
    ).stdout
    result: dict[tuple, tuple[int, int]] = {}
    key = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            key = None
            parts = line.split()
            m = re.search(r"pid=(\d+)", line)
            # with a state filter ss drops the State column: Recv-Q Send-Q Local Peer users
            if m and int(m.group(1)) in pids and len(parts) >= 4:
                key = (int(m.group(1)), parts[2], parts[3])
        elif key is not None:
            sent = re.search(r"\bbytes_sent:(\d+)", line)
            recv = re.search(r"\bbytes_received:(\d+)", line)
            result[key] = (int(sent.group(1)) if sent else 0, int(recv.group(1)) if recv else 0)
            key = None
    return result


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def views(agents: list[AgentProcess]) -> list[set[str] | None]:
    out = []
    for a in agents:
        try:
            out.append(a.view())
        except Exception:
            out.append(None)
    return out


class AgentDied(RuntimeError):
    pass


def check_alive(agents: list[AgentProcess]) -> None:
    dead = [a for a in agents if a.proc.poll() is not None]
    if dead:
        a = dead[0]
        raise AgentDied(f"{a.name} exited with {a.proc.returncode}; log tail: {a.log()[-300:]!r}")


def wait_ready(a: AgentProcess, timeout: float = 120.0) -> None:
    """Like AgentProcess.wait_ready, but an agent that exits fails at once instead of at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive([a])
        try:
            a.get("/health", timeout=2)
            return
        except OSError:
            time.sleep(0.05)
    raise AgentDied(f"{a.name} not ready after {timeout} s")


def run_size(n: int, window: float, workdir: Path, rng: random.Random, soak: float = 0.0) -> dict:
    secret = new_secret()
    agents: list[AgentProcess] = []
    addrs: list[str] = []
    try:
        t_first = time.monotonic()
        for i in range(n):
            args = ["--no-compute", *(["--bootstrap", rng.choice(addrs)] if addrs else [])]
            a = AgentProcess(workdir / f"n{n}", f"a{i:02d}", *args, secret_hex=secret)
            t_last_start = time.monotonic()
            a.start()
            agents.append(a)
            wait_ready(a)
            addrs.append(a.addr)
        t_last_ready = time.monotonic()
        startup_s = t_last_ready - t_first
        ids = {a.peer_id for a in agents}

        while not all(v == ids for v in views(agents)):  # not harness.wait_for: it swallows AgentDied
            check_alive(agents)
            if time.monotonic() - t_last_ready > CONVERGE_TIMEOUT_S:
                raise AgentDied(f"views did not converge within {CONVERGE_TIMEOUT_S} s")
            time.sleep(0.05)
        t_conv = time.monotonic()
        log_at_conv = [len(a.log()) for a in agents]

        time.sleep(SETTLE_S)
        pids = {a.proc.pid: a for a in agents}
        http_ports = {a.proc.pid: str(a.http_port) for a in agents}

        def snapshot():
            return {
                k: v for k, v in socket_bytes(set(pids)).items() if not k[1].endswith(":" + http_ports[k[0]])
            }

        cpu0 = {pid: cpu_seconds(pid) for pid in pids}
        b0, w0 = snapshot(), time.monotonic()
        flaps, samples = 0, 0
        while time.monotonic() - w0 < window - 1.0:
            time.sleep(1.0)
            for v in views(agents):
                samples += 1
                flaps += v != ids
        time.sleep(max(0.0, window - (time.monotonic() - w0)))
        b1, w1 = snapshot(), time.monotonic()
        check_alive(agents)  # a killed agent would make the window meaningless
        cpu1 = {pid: cpu_seconds(pid) for pid in pids}
        elapsed = w1 - w0
        soak_flaps, soak_samples, t_soak = 0, 0, time.monotonic()
        while time.monotonic() - t_soak < soak:
            time.sleep(5.0)
            check_alive(agents)
            for v in views(agents):
                soak_samples += 1
                soak_flaps += v != ids
        expiries = sum(a.log()[at:].count("expired from the view") for a, at in zip(agents, log_at_conv, strict=True))
        observed_s = time.monotonic() - t_conv

        sent = collections.Counter()
        recv = collections.Counter()
        conns = collections.Counter()
        for k, (s1, r1) in b1.items():
            s0, r0 = b0.get(k, (0, 0))
            sent[k[0]] += s1 - s0
            recv[k[0]] += r1 - r0
            conns[k[0]] += 1
        # TCP connections per pair of agents: the issue wants exactly one per peer
        owner = {k[1]: k[0] for k in b1}
        per_pair = collections.Counter(
            frozenset((k[0], owner[k[2]])) for k in b1 if k[2] in owner and k[1] < k[2]
        )
        dup_pairs = sum(1 for c in per_pair.values() if c > 1)
        sent_rates = sorted(sent[p] / elapsed for p in pids)
        mean_sent = sum(sent_rates) / n
        mean_recv = sum(recv[p] / elapsed for p in pids) / n
        cpu = [(cpu1[p] - cpu0[p]) / elapsed for p in pids]

        noise = collections.Counter()
        tracebacks = 0
        for a in agents:
            text = a.log()
            tracebacks += text.count("Traceback")
            for line in text.splitlines():
                m = re.search(r"\b(WARNING|ERROR|CRITICAL)\s+(\S+): (.*)", line)
                if m:
                    # group by logger and the message with ids and numbers blanked out
                    msg = re.sub(r"12D3KooW\w+", "<peer>", m.group(3))
                    msg = re.sub(r"\d+(\.\d+)?", "#", msg)[:120]
                    noise[f"{m.group(1)} {m.group(2)}: {msg}"] += 1
        return {
            "n": n,
            "startup_s": startup_s,
            "conv_from_start_s": t_conv - t_last_start,
            "conv_from_ready_s": t_conv - t_last_ready,
            "sent_per_agent": mean_sent,
            "recv_per_agent": mean_recv,
            "sent_min": sent_rates[0],
            "sent_max": sent_rates[-1],
            "conns_per_agent": sum(conns.values()) / n,
            "pairs": len(per_pair),
            "dup_pairs": dup_pairs,
            "cpu_mean": sum(cpu) / n,
            "cpu_max": max(cpu),
            "flaps": flaps,
            "samples": samples,
            "soak_flaps": soak_flaps,
            "soak_samples": soak_samples,
            "expiries": expiries,
            "observed_s": observed_s,
            "noise": noise,
            "tracebacks": tracebacks,
        }
    finally:
        for a in agents:  # SIGTERM everyone first, then wait: n sequential stops would take long
            a.signal(signal.SIGTERM)
        for a in agents:
            try:
                a.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            a.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--window", type=float, default=10.0, help="steady-state measurement window (s)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--soak", type=float, default=0.0, help="watch views this many more seconds (s)")
    ap.add_argument("--keep", action="store_true", help="keep the agents' data dirs and logs")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="p2pinfer-gossip-bench-"))
    print(f"agents on 127.0.0.1, mDNS off, logs in {workdir}, {os.cpu_count()} cores", flush=True)

    results = []
    t0 = time.monotonic()
    for n in sizes:
        for attempt in range(3):
            try:
                r = run_size(n, args.window, workdir / f"try{attempt}", rng, args.soak)
                break
            except (AgentDied, AssertionError) as e:  # e.g. something else on the box killed an agent
                print(f"N={n}: run {attempt + 1} invalid, retrying: {e}", flush=True)
        else:
            sys.exit(f"N={n}: three invalid runs, giving up")
        results.append(r)
        print(
            f"N={n}: started in {r['startup_s']:.1f} s, converged {r['conv_from_start_s']:.2f} s after the "
            f"last start, {r['sent_per_agent']:.0f} B/s sent per agent, {r['expiries']} expiries of live peers "
            f"in {r['observed_s']:.0f} s after convergence",
            flush=True,
        )

    base = results[0]
    print()
    print(
        f"{'N':>3} {'conv s':>7} {'(ready)':>8} {'B/s/agent':>10} {'min':>7} {'max':>7} {'B/s/peer':>9} "
        f"{'conns':>6} {'pairs':>5} {'dup':>4} {'cpu%':>5} {'cpu%max':>7} {'flaps':>7} {'x B/s/agent':>12} {'x B/s/peer':>11} "
        f"{'expiries':>8} {'soak flaps':>10}"
    )
    for r in results:
        per_peer = r["sent_per_agent"] / r["n"]
        base_peer = base["sent_per_agent"] / base["n"]
        print(
            f"{r['n']:>3} {r['conv_from_start_s']:>7.2f} {r['conv_from_ready_s']:>8.2f} "
            f"{r['sent_per_agent']:>10.0f} {r['sent_min']:>7.0f} {r['sent_max']:>7.0f} {per_peer:>9.0f} "
            f"{r['conns_per_agent']:>6.1f} {r['pairs']:>5} {r['dup_pairs']:>4} {100 * r['cpu_mean']:>5.1f} {100 * r['cpu_max']:>7.1f} "
            f"{r['flaps']:>3}/{r['samples']:<3} {r['sent_per_agent'] / base['sent_per_agent']:>12.2f} "
            f"{per_peer / base_peer:>11.2f} {r['expiries']:>8} {r['soak_flaps']:>4}/{r['soak_samples']:<5}"
        )
    print(
        f"\nconv s: last agent's process start -> every view holds all N ((ready): from its /health). "
        f"B/s/agent: TCP payload sent per agent over {args.window:.0f} s in steady state (received is "
        f"equal on loopback); B/s/peer: that divided by N. x: ratio to N={base['n']}. "
        f"conns: TCP sockets per agent; pairs: agent pairs with a connection (of N(N-1)/2), dup: pairs "
        f"with more than one. flaps: view samples missing someone. expiries: live peers expired from a view "
        f"after convergence (window and soak). cpu%: of one core per agent over the window."
    )
    for r in results:
        if r["noise"] or r["tracebacks"]:
            print(f"\nN={r['n']} log noise ({r['tracebacks']} tracebacks):")
            for msg, count in r["noise"].most_common(6):
                print(f"  {count:>5}  {msg}")
    print(f"\ntotal {time.monotonic() - t0:.0f} s")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    main()
