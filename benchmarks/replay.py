"""What a member's death costs the client: the longest gap between two tokens across a replay.

Four real agents on 127.0.0.1 at a --memory-limit that needs rings of three, so one is a spare, and a
gateway (--no-compute) that the client calls, so that any ring member can be the one killed. Each
trial streams a greedy answer, SIGKILLs a non-entry member of its ring at the KILL_AT-th token, and
records when every chunk arrived; the killed agent is restarted (cold) before the next trial. The entry
replays on the ring repaired by cluster.ring.repair_ring: survivors keep their warm shards, the spare
loads the lost range. Reported per trial: the longest gap, the median gap of the other tokens, and the
spare's shard load time from its log (the issue's goal: longest gap <= one load of the missing range).
Twice: with --no-preload (the spare loads the lost range cold), then with spares pre-loading (the
victim is the member whose range a spare holds; goal: longest gap <= 2 s).

Run: python benchmarks/replay.py [--trials 3]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.harness import AgentProcess, new_secret, wait_for  # noqa: E402

MODEL = "smollm2-135m"
KILL_AT = 8
LOADED = re.compile(r"loaded \S+ layers \[(\d+), (\d+)\) in ([\d.]+) s")
REPLAY = re.compile(r"replaying .* on ring (.*)")


def start_cluster(work: Path, extra: tuple[str, ...]) -> list[AgentProcess]:
    """A gateway entry (--no-compute: any ring member may be the victim) and four computing peers."""
    secret = new_secret()
    gateway = AgentProcess(work, "gw", "--no-compute", *extra, secret_hex=secret).start()
    gateway.wait_ready()
    agents = [gateway] + [AgentProcess(work, f"p{i}", "--memory-limit", "100M", *extra, "--bootstrap", gateway.addr,
                                       secret_hex=secret).start() for i in range(4)]  # fmt: skip
    ids = {a.wait_ready()["peer_id"] for a in agents}
    for a in agents:
        wait_for(lambda a=a: a.view() == ids, 30, what="views")
    return agents


def spare_copy(entry) -> tuple[int, int] | None:
    """The range a spare (a peer outside the ring) holds warm, if one does."""
    peers = entry.get("/v1/cluster")["peers"]
    ranges = [tuple(x[1:]) for p in peers for x in p["layers"]]
    return next((r for r in ranges if ranges.count(r) == 2), None)


def trial(agents, client, kw, warm_spare: bool) -> dict:
    entry = agents[0]
    ids = {a.peer_id: a for a in agents}
    stamps, victim = [], None
    if warm_spare:
        wait_for(lambda: spare_copy(entry), 120, what="a spare to pre-load a range")
    logs_before = {a.name: len(a.log()) for a in agents}
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
        if victim is None and len(stamps) == KILL_AT:
            ring = next(iter(entry.get("/v1/cluster")["rings"].values()))
            members = [(p, s, e) for p, s, e in ring if p != entry.peer_id]
            if warm_spare:  # the member whose range a spare holds
                members = [m for m in members if tuple(m[1:]) == spare_copy(entry)] or members
            victim = ids[members[0][0]]
            victim.signal(signal.SIGKILL)
            killed_at = time.time()
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    loads = [f"{a.name}[{m.group(1)},{m.group(2)}) {float(m.group(3)):.1f} s" for a in agents if a is not victim
             for m in LOADED.finditer(a.log()[logs_before[a.name]:])]  # fmt: skip
    if os.environ.get("REPLAY_DEBUG"):
        wall = time.time() - time.monotonic()
        print(
            f"  killed {time.strftime('%H:%M:%S', time.localtime(killed_at))}.{int(killed_at % 1 * 1000):03d}; "
            f"token 8 at +{(stamps[7] + wall - killed_at):.3f} s, token 9 at +{(stamps[8] + wall - killed_at):.3f} s"
        )
        for a in agents:
            print(
                "\n".join(
                    f"  {a.name} {line[11:]}"
                    for line in a.log()[logs_before[a.name] :].splitlines()
                    if "membership" not in line
                )
            )
    replays = REPLAY.findall(entry.log()[logs_before[entry.name] :])
    return {"victim": victim, "replays": replays, "tokens": len(stamps), "longest_gap": gaps[worst], "at_token": worst + 1,
            "median_gap": statistics.median(g for i, g in enumerate(gaps) if i != worst), "loads": loads}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--mode", choices=("both", "cold", "warm"), default="both")
    args = ap.parse_args()
    for warm_spare in {"both": (False, True), "cold": (False,), "warm": (True,)}[args.mode]:
        print("spares pre-load (the default):" if warm_spare else "cold spare (--no-preload):", flush=True)
        run(args.trials, warm_spare)


def run(trials: int, warm_spare: bool) -> None:
    extra = ("--peer-ttl", "4") + (() if warm_spare else ("--no-preload",))
    with tempfile.TemporaryDirectory() as tmp:
        agents = start_cluster(Path(tmp), extra)
        try:
            entry = agents[0]
            client = openai.OpenAI(base_url=entry.url + "/v1", api_key="x", timeout=600, max_retries=0)
            kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a story about a lighthouse."}],
                      max_tokens=40, temperature=0)  # fmt: skip
            reference = client.chat.completions.create(**kw).choices[0].message.content  # every shard loaded
            for t in range(trials):
                r = trial(agents, client, kw, warm_spare)
                print(f"trial {t}: {r['tokens']} tokens; longest gap {r['longest_gap']:.2f} s after token "
                      f"{r['at_token']} (median gap {r['median_gap'] * 1000:.0f} ms); shard loads during the "
                      f"replay: {', '.join(r['loads']) or 'none'}; replayed on {'; '.join(r['replays'])}", flush=True)  # fmt: skip
                victim = r["victim"]
                victim.stop()
                victim.start()
                victim.wait_ready(120)
                ids = {a.peer_id for a in agents}
                wait_for(lambda ids=ids: entry.view() == ids, 30, what="the restarted peer back in the view")
            assert client.chat.completions.create(**kw).choices[0].message.content == reference
        finally:
            for a in agents:
                a.stop()


if __name__ == "__main__":
    main()
