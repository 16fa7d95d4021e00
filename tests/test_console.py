"""`p2pinfer chat` and `p2pinfer status` as a user runs them: real processes on a pty (pexpect), against a
real agent on 127.0.0.1."""

from __future__ import annotations

import json
import sys
import threading
import urllib.request

import pexpect
import pytest

from tests.harness import AgentProcess, new_secret

MODEL = "smollm2-135m"
PROMPT = "you> "


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("console"), "a", secret_hex=new_secret()).start()
    try:
        a.wait_ready(120)
        yield a
    finally:
        a.stop()


def spawn(tmp_path, *args: str, timeout: float = 60) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "p2pinfer", *args], encoding="utf-8", codec_errors="replace", timeout=timeout,
                          dimensions=(50, 160), env={"TERM": "xterm", "PATH": "/usr/bin:/bin",
                                                     "HOME": str(tmp_path), "COLUMNS": "160"})  # fmt: skip
    child.logfile_read = open(tmp_path / f"{args[0]}.pty.log", "a")  # noqa: SIM115 (closed with the child)
    return child


def test_chat_repl(agent, tmp_path):
    data = tmp_path / "data"
    child = spawn(tmp_path, "chat", "--url", agent.url, "--data-dir", str(data), "--temperature", "0",
                  "--max-tokens", "24")  # fmt: skip
    child.expect("model .*smollm2-135m")
    child.expect_exact(PROMPT)
    child.sendline("/models")
    child.expect("smollm2-135m.*8192")
    child.expect_exact(PROMPT)
    child.sendline("/peers")
    child.expect(agent.peer_id[-6:])
    child.expect("this peer")
    child.expect_exact(PROMPT)
    child.sendline("/model no-such-model")
    child.expect("no model 'no-such-model'")
    child.expect_exact(PROMPT)
    child.sendline("What is the capital of France?")
    child.expect("ai>", timeout=600)
    child.expect("Paris", timeout=300)
    child.expect(r"tokens · TTFT [0-9.]+ s", timeout=300)
    child.expect_exact(PROMPT)
    child.sendline("/status")
    child.expect("history: 2 messages")
    child.expect_exact(PROMPT)
    # Ctrl-C stops an answer, not the program
    child.sendline("/model " + MODEL)
    child.expect_exact(PROMPT)
    child.sendline("Write a very long story about a dragon who learns to cook. Use many chapters.")
    child.expect("ai>", timeout=300)
    child.expect(r"\w+ \w+", timeout=120)  # a few words are out
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact(PROMPT)
    assert child.isalive()
    child.sendline("/status")
    child.expect("history: 4 messages")
    child.expect_exact(PROMPT)
    # the stopped request was cancelled on the peer (its connection closed)
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect_exact(PROMPT)
    child.sendline("/status")
    child.expect("history: 0 messages")
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: a new line, still running
    child.expect_exact(PROMPT)
    assert child.isalive()
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "/models" in (data / "chat_history").read_text()  # input history kept across runs
    reqs = agent.get("/v1/requests")["data"]
    assert any(r["state"] == "cancelled" for r in reqs), reqs


def test_status_table_and_watch(agent, tmp_path):
    child = spawn(tmp_path, "status", "--url", agent.url)
    child.expect(agent.peer_id[-6:])
    child.expect("this peer")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    child = spawn(tmp_path, "status", "--url", agent.url, "--watch", "0.5")
    child.expect(agent.peer_id[-6:])
    child.expect("requests entered here")
    child.expect("requests entered here")  # redrawn
    child.sendintr()  # may cut a redraw mid-character: the pty log is decoded with replacement
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    # an unreachable peer: one sentence, exit 1
    child = spawn(tmp_path, "status", "--url", "http://127.0.0.1:9")
    child.expect("cannot reach http://127.0.0.1:9")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1


def test_status_watch_shows_a_load_in_progress(tmp_path):
    """`p2pinfer status --watch` while a request makes an agent load its layers (cold: an empty kernel cache,
    no warm-up at start): the range shows as loading, with the progress the record gossips, then as held."""
    cold = AgentProcess(tmp_path, "cold", "--no-warm", secret_hex=new_secret(),
                        env={"CACHEDB": str(tmp_path / "cold.db")})  # fmt: skip
    cold.start()
    try:
        cold.wait_ready(120)
        child = spawn(tmp_path, "status", "--url", cold.url, "--watch", "0.3")
        child.expect("requests entered here")
        assert not next(p for p in cold.get("/v1/cluster")["peers"] if p["self"])["loading"]
        body = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        req = urllib.request.Request(cold.url + "/v1/chat/completions", body.encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        answered: list[int] = []
        asker = threading.Thread(
            target=lambda: answered.append(urllib.request.urlopen(req, timeout=600).status)
        )
        asker.start()
        child.expect(r"loading smollm2-135m \[0, 30\) +\d+%", timeout=300)
        asker.join(600)
        assert answered == [200]
        child.expect(r"smollm2-135m \[0, 30\) +│")  # held, no longer loading
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
    finally:
        cold.stop()
