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
            openai.OpenAI(base_url=a.url + "/v1", api_key="x", timeout=600, max_retries=0) for a in entries
        ]

        def ask(client: openai.OpenAI, prompt: str) -> str:
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=12, temperature=0)  # fmt: skip
            assert r.choices[0].finish_reason in ("stop", "length")
            return r.choices[0].message.content

        reference = {p: ask(clients[0], p) for p in PROMPTS}  # also loads every member's shard
        rss_start = {a.name: _rss_mib(a) for a in entries}

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
                # RSS is compared from after the first quarter: by then churn has moved ranges around and
                # every long-lived peer holds what it will hold (bounded by --memory-limit); growth after
                # that would be a leak
                answers = list(pool.map(lambda job: (job[1], ask(*job)), jobs[: REQUESTS // 4]))
                rss_mid = {a.name: _rss_mib(a) for a in entries}
                answers += list(pool.map(lambda job: (job[1], ask(*job)), jobs[REQUESTS // 4 :]))
        finally:
            stop.set()
            churn_thread.join()
        elapsed = time.monotonic() - t0
        rss_end = {a.name: _rss_mib(a) for a in entries}
        replays = sum(a.log().count("replaying") for a in entries)
        print(f"\nsoak: {REQUESTS} requests in {elapsed:.0f} s, {len(restarts)} restarts, {replays} replays; "
              f"RSS MiB start {rss_start} after {REQUESTS // 4} {rss_mid} end {rss_end}")  # fmt: skip
        wrong = [(p, got) for p, got in answers if got != reference[p]]
        assert not wrong, wrong[:3]
        assert len(restarts) >= 2, "the soak ended before the churn peer was restarted twice"
        for a in entries:
            assert a.proc.poll() is None and "Traceback" not in a.log(), a.log()[-2000:]
            assert rss_end[a.name] - rss_mid[a.name] < 64, (
                f"{a.name} grew {rss_mid[a.name]} -> {rss_end[a.name]} MiB"
            )
    finally:
        for a in agents:
            a.stop()
