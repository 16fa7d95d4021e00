"""Soak: 200 greedy requests at concurrency 4 against 4 peers while one of them is restarted every 20 s.

Nothing may be lost: every answer must equal the undisturbed one (a replay is exact), no peer logs a
traceback, and the resident memory of the long-lived peers stays flat (start and end are printed).
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.harness import AgentProcess, new_secret, wait_for
from tests.test_ring_api import LIMIT, MODEL

pytestmark = pytest.mark.slow

REQUESTS = 200
CONCURRENCY = 4
RESTART_EVERY = 20.0
PROMPTS = ["Name a colour.", "Say hello.", "What is 2+2?", "Name a fruit.", "Name an animal."]


def _rss_mib(a: AgentProcess) -> float:
    with open(f"/proc/{a.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_soak_with_a_peer_restarting(tmp_path):
    secret = new_secret()
    args = ("--memory-limit", LIMIT, "--peer-ttl", "4")
    first = AgentProcess(tmp_path, "p0", *args, secret_hex=secret).start()
    agents = [first]
    try:
        first.wait_ready()
        agents += [AgentProcess(tmp_path, f"p{i}", *args, "--bootstrap", first.addr, secret_hex=secret).start()
                   for i in range(1, 4)]  # fmt: skip
        ids = {a.wait_ready()["peer_id"] for a in agents}
        for a in agents:
            wait_for(lambda a=a: a.view() == ids, 30, what=f"{a.name} sees all four")
        entries, churn = agents[:3], agents[3]
        clients = [
            openai.OpenAI(base_url=a.url + "/v1", api_key="x", timeout=600, max_retries=2) for a in entries  # the SDK default: a 503 says Retry-After
        ]

        def ask(client: openai.OpenAI, prompt: str) -> str:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=12, temperature=0)  # fmt: skip
            assert r.choices[0].finish_reason in ("stop", "length")
            return r.choices[0].message.content

        reference = {p: ask(clients[0], p) for p in PROMPTS}  # also loads every member's shard
        rss_start = {a.name: round(_rss_mib(a)) for a in entries}

        stop = threading.Event()
        restarts = []

        def churner() -> None:
            while not stop.wait(RESTART_EVERY):
                churn.signal(signal.SIGKILL)
                churn.proc.wait()
                churn.start()
                restarts.append(time.monotonic())

        jobs = list(zip(itertools.islice(itertools.cycle(clients), REQUESTS),
                        itertools.islice(itertools.cycle(PROMPTS), REQUESTS), strict=True))  # fmt: skip
        t0 = time.monotonic()
        churn_thread = threading.Thread(target=churner, daemon=True)
        churn_thread.start()
        try:
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                # RSS is sampled after every quarter. Held shards move under churn (bounded by
                # --memory-limit) and the allocator keeps its high-water mark, so early growth is
                # expected; growth over the second half would be a leak
                answers, rss_q = [], []
                for q in range(4):
                    part = jobs[q * REQUESTS // 4 : (q + 1) * REQUESTS // 4]
                    answers += list(pool.map(lambda job: (job[1], ask(*job)), part))
                    rss_q.append({a.name: round(_rss_mib(a)) for a in entries})
        finally:
            stop.set()
            churn_thread.join()
        elapsed = time.monotonic() - t0
        replays = sum(a.log().count("replaying") for a in entries)
        print(f"\nsoak: {REQUESTS} requests in {elapsed:.0f} s, {len(restarts)} restarts, {replays} replays; "
              f"RSS MiB at start {rss_start}, after each quarter {rss_q}")  # fmt: skip
        wrong = [(p, got) for p, got in answers if got != reference[p]]
        assert not wrong, wrong[:3]
        assert len(restarts) >= 2, "the soak ended before the churn peer was restarted twice"
        for a in entries:
            assert a.proc.poll() is None and "Traceback" not in a.log(), a.log()[-2000:]
            half, end = rss_q[1][a.name], rss_q[3][a.name]
            assert end - half < 64, f"{a.name} grew {half} -> {end} MiB over the second half"
    finally:
        for a in agents:
            a.stop()
