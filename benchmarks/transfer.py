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

  --contention (alone): a lone agent's decode tok/s by itself and while an admitted peer pulls the model's
            chunks from it on 4 streams, with no --upload-limit and with 20M: what serving bytes costs
            serving tokens (measured here: 0.52x unlimited, 0.98x at 20M, 2 cores shared by both processes)

Run: python benchmarks/transfer.py [--sources 1] [--bulk-mb 64] [--upload-limit 0] | --contention
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


def tokens_per_second(agent: AgentProcess, n: int = 200) -> float:
    """Decode rate of one streamed completion on `agent` (first token to last)."""
    body = json.dumps({"model": MODEL, "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": n,
                       "stream": True}).encode()  # fmt: skip
    req = urllib.request.Request(
        agent.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    )
    times = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {") and (json.loads(line[6:]).get("choices") or [{}])[0].get("text"):
                times.append(time.monotonic())
    return (len(times) - 1) / (times[-1] - times[0])


async def _download_forever(addr: str, secret: bytes, seconds: float) -> float:
    """Pull every chunk of the model from the peer at `addr` again and again (an admitted peer on 4
    streams, as a fetcher does) for `seconds`; MB/s pulled."""
    import multiaddr
    import trio

    from p2pinfer.identity import Identity
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.net.blobs import BlobClient
    from p2pinfer.net.host import build_host
    from p2pinfer.serve.fetch import PROTOCOL
    from p2pinfer.weights.manifest import CHUNK, MAX_MANIFEST_BYTES, decode

    host = build_host(Identity(b"\x44" * 32).key_pair, secret, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    got = 0
    async with host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        info = parse_peer_addr(addr)
        await host.connect(info)
        peer = info.peer_id.to_base58()
        holder = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{_HTTP[addr]}/v1/cluster").read())
        root = holder["peers"][0]["weights"][0][2]
        async with BlobClient(host, peer, PROTOCOL) as c:
            _, raw = await c.request({"root": root, "manifest": True}, MAX_MANIFEST_BYTES)
        n = len(decode(raw, root).chunks)
        t0 = time.monotonic()

        async def pull(k: int) -> None:
            nonlocal got
            async with BlobClient(host, peer, PROTOCOL) as c:
                i = k
                while time.monotonic() - t0 < seconds:
                    _, body = await c.request({"root": root, "i": i % n}, CHUNK)
                    got += len(body)
                    i += 4

        async with trio.open_nursery() as nursery:
            for k in range(4):
                nursery.start_soon(pull, k)
    return got / 1e6 / seconds


_HTTP: dict[str, int] = {}


def contention(work: Path, upload_limit: str) -> tuple[float, float, float]:
    """A lone agent's decode tok/s alone, and while a peer downloads the model from it; download MB/s."""
    import threading

    import trio

    secret = new_secret()
    extra = ["--upload-limit", upload_limit] if upload_limit else []
    a = AgentProcess(work, f"holder-{upload_limit or 'unlimited'}", *extra, secret_hex=secret).start()
    try:
        a.wait_ready()
        wait_for(lambda: a.get("/v1/cluster")["peers"][0]["weights"], 60, what="holder hashing")
        tokens_per_second(a, 20)  # loads and warms the model
        alone = tokens_per_second(a)
        _HTTP[a.addr] = a.http_port
        rate: list[float] = []
        t = threading.Thread(
            target=lambda: rate.append(trio.run(_download_forever, a.addr, bytes.fromhex(secret), 8))
        )
        t.start()
        time.sleep(1)
        busy = tokens_per_second(a)
        t.join()
        return alone, busy, rate[0]
    finally:
        a.stop()


def rss_mb(agent: AgentProcess) -> float:
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", type=int, default=1, help="peers holding the file (default 1)")
    ap.add_argument("--bulk-mb", type=int, default=64)
    ap.add_argument("--upload-limit", default="", help="holders' --upload-limit (default: none)")
    ap.add_argument("--contention", action="store_true", help="only: decode tok/s of a peer while it uploads")
    args = ap.parse_args()
    if args.contention:
        work = Path(tempfile.mkdtemp(prefix="p2pinfer-transfer-"))
        for limit in ("", "20M"):
            alone, busy, rate = contention(work, limit)
            print(f"upload limit {limit or 'none':>4}: decode {alone:.0f} tok/s alone, {busy:.0f} tok/s while "
                  f"uploading {rate:.0f} MB/s ({busy / alone:.2f}x)", flush=True)  # fmt: skip
        return
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
