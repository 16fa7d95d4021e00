"""Weights fetched peer to peer against the raw link, and the time from `--join` to a first token.

In one run, one after the other (the box is shared, so compare within a run):

  link      our libp2p link's bulk MB/s between two processes (benchmarks/link.py's `tuned` config:
            TCP + Noise + admission + yamux, what agents run): the ceiling for any transfer
  fetch     `--sources N` holders of SmolLM2 (`--no-compute`: they upload, never compute) and a fresh
            peer (`p2pinfer run --join TOKEN --no-local-models`, no memory limit, so it serves the
            whole model alone and fetches every chunk): a streaming request goes to the fresh peer as
            soon as its HTTP port answers. Reported: the fetch's MB/s (from its log: bytes verified and
            written / wall time, N peers at once), its ratio to `link`, and join-to-first-token
            (fresh process start to the first streamed token: start-up, gossip, header, chunks, load,
            kernels from the shared cache, prefill)
  rss       VmRSS of the fresh peer after its answer, against a lone agent that loaded the same model
            from its own file and answered the same request

Run: python benchmarks/transfer.py [--sources 1] [--bulk-mb 64] [--upload-limit 0]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from link import run_config  # noqa: E402

from tests.harness import AgentProcess, new_secret, wait_for  # noqa: E402

MODEL = "smollm2-135m"
PROMPT = "What is the capital of France?"


def first_token_seconds(agent: AgentProcess, t_start: float) -> float:
    """Stream a chat request (retrying while the agent does not know the model yet); seconds from t_start."""
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
                       "max_tokens": 8, "stream": True}).encode()  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        req = urllib.request.Request(agent.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                for line in r:
                    if not line.startswith(b"data: {"):
                        continue
                    choices = json.loads(line[6:]).get("choices") or [{}]
                    if choices[0].get("delta", {}).get("content"):  # a token, not the role's empty delta
                        t = time.monotonic() - t_start
                        r.read()
                        return t
        except urllib.error.HTTPError as e:
            if e.code not in (404, 503):  # not in the view yet / no ring yet
                raise
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no first token from {agent.name} within 600 s:\n{agent.log()[-3000:]}")


def rss_mb(agent: AgentProcess) -> float:
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=1, help="peers holding the file (default 1)")
    ap.add_argument("--bulk-mb", type=int, default=64)
    ap.add_argument("--upload-limit", default="", help="holders' --upload-limit (default: none)")
    args = ap.parse_args()
    link = run_config("tuned", args.bulk_mb, 50)["bulk"]
    print(f"link (libp2p, tuned) bulk: {link:.1f} MB/s", flush=True)

    work = Path(tempfile.mkdtemp(prefix="p2pinfer-transfer-"))
    secret = new_secret()
    agents: list[AgentProcess] = []
    try:
        extra = ["--upload-limit", args.upload_limit] if args.upload_limit else []
        holders = []
        for i in range(args.sources):
            boot = ["--bootstrap", holders[0].addr] if holders else []
            h = AgentProcess(work, f"holder{i}", "--no-compute", *extra, *boot, secret_hex=secret).start()
            agents.append(h)
            h.wait_ready()
            wait_for(lambda h=h: h.get("/v1/cluster")["peers"][0]["weights"], 60, what="holder hashing")
            holders.append(h)
        token = subprocess.run([sys.executable, "-m", "p2pinfer", "invite", "--data-dir", str(holders[0].data_dir),
                                "--cluster-secret-file", str(work / "holder0.secret")],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        fresh = AgentProcess(work, "fresh", "--no-local-models", "--join", token)
        agents.append(fresh)
        t0 = time.monotonic()
        fresh.start()
        # (the request waits until gossip has shown the fresh peer every holder: what a client sees anyway)
        wait_for(lambda: sum(bool(p["weights"]) for p in fresh.get("/v1/cluster")["peers"]) >= args.sources, 60,
                 interval=0.02, what="the fresh peer to see every holder")  # fmt: skip
        ttft = first_token_seconds(fresh, t0)
        log = fresh.log()
        fetched = re.findall(r"fetched smollm2-135m parts .*?: ([\d.]+) MB in ([\d.]+) s \(([\d.]+) MB/s\) "
                             r"from (\d+) peer", log)  # fmt: skip
        loaded = re.findall(r"loaded smollm2-135m layers .*?load ([\d.]+)s, warm ([\d.]+)s", log)
        mb, secs, rate, peers = fetched[-1]
        fresh_rss = rss_mb(fresh)
        fresh.stop()
        print(f"fetch: {mb} MB in {secs} s from {peers} peer(s): {float(rate):.1f} MB/s = "
              f"{float(rate) / link:.2f}x the link", flush=True)  # fmt: skip
        print(
            f"join to first token: {ttft:.1f} s (shard load {loaded[-1][0]} s, warm {loaded[-1][1]} s)",
            flush=True,
        )
        for h in holders:
            h.stop()
        lone = AgentProcess(work, "lone", "--no-warm", secret_hex=new_secret())
        agents.append(lone)
        t0 = time.monotonic()
        lone.start()
        lone_ttft = first_token_seconds(lone, t0)
        lone_rss = rss_mb(lone)
        print(f"lone agent with the file: first token {lone_ttft:.1f} s after start", flush=True)
        print(f"RSS after one answer: fetched {fresh_rss:.0f} MB, own file {lone_rss:.0f} MB "
              f"({fresh_rss / lone_rss:.2f}x)")  # fmt: skip
    finally:
        for a in agents:
            a.stop()


if __name__ == "__main__":
    main()
