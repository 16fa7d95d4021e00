"""Progress bars for shard loading and kernel warm-up (p2pinfer/progress.py), fed by Shard.load's progress
callback: drawn with rich on a terminal (a real pty), nothing but plain log lines when stderr is not one.

Real engine loads of SmolLM2 (kernels from the tests' shared cache, so a load takes seconds).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pexpect
import pytest

from p2pinfer.progress import LoadProgress, overall
from tests.harness import SHARED_KERNEL_CACHE

MODEL = "smollm2-135m"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
BAR = "━"

# What the agent does (p2pinfer/serve/shards.py + agent.py): the engine loads a range in a worker thread
# and reports to a LoadProgress; progress.watch draws it; logs keep flowing meanwhile.
AGENT_LIKE = textwrap.dedent("""
    import json, logging, sys, trio
    from p2pinfer import progress
    from p2pinfer.config import load_settings
    from p2pinfer.engine import ModelCatalog, Shard, use_kernel_cache
    from p2pinfer.logs import setup_logging

    async def main():
        setup_logging("INFO")
        use_kernel_cache(sys.argv[1])
        entry = ModelCatalog(load_settings({}).models_dirs).get("%(model)s")
        tracker, key, seen, loaded = progress.LoadProgress(), ("%(model)s", 0, 10), [], trio.Event()
        log = logging.getLogger("p2pinfer.shards")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress.watch, tracker)

            async def sample():
                while not loaded.is_set():
                    seen.append(tracker.fraction(key))
                    await trio.sleep(0.02)

            nursery.start_soon(sample)
            log.info("loading %%s layers [0, 10)", entry.name)
            report = tracker.reporter(key)
            await trio.to_thread.run_sync(lambda: Shard.load(entry, 0, 10, progress=report))
            loaded.set()
            seen.append(tracker.fraction(key))
            tracker.forget(key)
            log.info("a log line after the load")
            await trio.sleep(0.5)  # the bars go
            nursery.cancel_scope.cancel()
        print("fractions", json.dumps(seen), flush=True)

    trio.run(main)
""") % {"model": MODEL}


def _env(tmp_path) -> dict:
    return {**os.environ, "TERM": "xterm", "COLUMNS": "160", "HOME": str(tmp_path),
            "CACHEDB": str(SHARED_KERNEL_CACHE)}  # fmt: skip


def _pty(tmp_path, args: list[str]) -> str:
    child = pexpect.spawn(sys.executable, args, env=_env(tmp_path), encoding="utf-8", codec_errors="replace",
                          dimensions=(40, 160), timeout=300)  # fmt: skip
    child.logfile_read = open(tmp_path / "pty.log", "a")  # noqa: SIM115 (closed with the child)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return (tmp_path / "pty.log").read_text()


def _plain_lines(raw: str) -> list[str]:
    """What a terminal shows in the scrollback: escape sequences removed, carriage returns as line ends."""
    return [ln.strip() for ln in re.split(r"[\r\n]+", ANSI.sub("", raw)) if ln.strip()]


def test_fraction_weighs_weights_then_kernels():
    p = LoadProgress()
    key = (MODEL, 0, 10)
    report = p.reporter(key)
    assert p.fraction(key) == 0.0
    report("load", 50, 100)
    assert p.fraction(key, step=0) == pytest.approx(0.25)
    report("load", 100, 100)
    report("warm", 1, 4)
    assert p.fraction(key, step=0) == pytest.approx(0.625) and p.fraction(key) == pytest.approx(0.6)
    report("warm", 4, 4)
    assert p.fraction(key) == 1.0
    assert set(p.snapshot()) == {key}
    p.forget(key)
    assert p.snapshot() == {} and p.fraction(key) == 0.0
    report("warm", 1, 4)  # a late report of a forgotten load is dropped
    assert p.snapshot() == {}
    assert overall({"load": (0, 0)}) == 0.5  # a stage that reported with nothing to do is done


def test_warm_draws_bars_on_a_terminal(tmp_path):
    raw = _pty(tmp_path, ["-m", "p2pinfer", "warm", "--data-dir", str(tmp_path / "data")])
    lines = _plain_lines(raw)
    weights = [ln for ln in lines if ln.startswith(f"{MODEL} [0, 30) weights") and BAR in ln]
    kernels = [ln for ln in lines if ln.startswith(f"{MODEL} [0, 30) kernels") and BAR in ln]
    assert weights and kernels, lines[-20:]
    assert any(re.search(r"100%\s+\d+/\d+ MiB", ln) for ln in weights), weights
    steps = [re.search(r"(\d+)/(\d+) steps", ln) for ln in kernels]
    done = [(int(m[1]), int(m[2])) for m in steps if m]
    assert done and done[-1][0] == done[-1][1] > 0, kernels  # counted up to every step template
    # the engine's log line was printed above the bars, whole, on its own line
    assert any(re.fullmatch(rf"\S+ \S+ INFO +p2pinfer\.engine\.shard: loaded {MODEL} layers \[0, 30\): .*warm [0-9.]+s", ln)
               for ln in lines), lines  # fmt: skip
    assert re.search(rf"warmed {MODEL} in [0-9.]+ s", lines[-1]), lines[-1]


def test_warm_without_a_terminal_prints_no_bars(tmp_path):
    r = subprocess.run([sys.executable, "-m", "p2pinfer", "warm", "--data-dir", str(tmp_path / "data")],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr + r.stdout and BAR not in r.stderr and "steps" not in r.stderr, r.stderr
    assert re.search(rf"loaded {MODEL} layers \[0, 30\)", r.stderr) and f"warmed {MODEL}" in r.stdout


def test_agent_watch_draws_a_loading_range_and_logs_stay_readable(tmp_path):
    script = tmp_path / "agent_like.py"
    script.write_text(AGENT_LIKE)
    raw = _pty(tmp_path, [str(script), str(tmp_path / "data")])
    lines = _plain_lines(raw)
    assert any(ln.startswith(f"{MODEL} [0, 10) weights") and BAR in ln for ln in lines), lines
    assert any(ln.startswith(f"{MODEL} [0, 10) kernels") and BAR in ln for ln in lines), lines
    for text in ("p2pinfer.shards: loading smollm2-135m layers [0, 10)",
                 "p2pinfer.engine.shard: loaded smollm2-135m layers [0, 10)", "p2pinfer.shards: a log line after the load"):  # fmt: skip
        assert any(re.fullmatch(r"\S+ \S+ INFO +" + re.escape(text) + ".*", ln) for ln in lines), (
            text,
            lines,
        )
    # once the load ended the bars were erased (rich's transient stop: erase-line codes after the last bar)
    assert raw.rindex(BAR) < raw.rindex("\x1b[2K") < raw.index("fractions"), raw[-600:]
    fractions = [float(x) for x in re.search(r"fractions (\[.*\])", raw)[1].strip("[]").split(",")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0, fractions
    assert any(0 < f < 1 for f in fractions), fractions  # seen part-way
    # the same script with stderr not a terminal: no bars, no escape codes, the same log lines
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "data")], env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stderr and BAR not in r.stderr, r.stderr
    assert "loaded smollm2-135m layers [0, 10)" in r.stderr and "fractions" in r.stdout


def _agent_wired() -> bool:
    from p2pinfer.serve.shards import ShardHost

    return hasattr(ShardHost(None, lambda: None), "progress")


@pytest.mark.xfail(not _agent_wired(), run=False, reason="ShardHost/Agent do not feed progress.watch yet")
def test_run_on_a_terminal_draws_bars_while_it_warms_the_default_model(tmp_path):
    """`p2pinfer run` on a terminal: the default model's warm-up at start is drawn, log lines stay whole."""
    from tests.harness import free_port

    port = free_port()
    child = pexpect.spawn(sys.executable, ["-m", "p2pinfer", "run", "--data-dir", str(tmp_path / "data"),
                          "--http-port", str(port), "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
                          env=_env(tmp_path), encoding="utf-8", codec_errors="replace", dimensions=(40, 160),
                          timeout=300)  # fmt: skip
    child.logfile_read = open(tmp_path / "pty.log", "a")  # noqa: SIM115 (closed with the child)
    try:
        child.expect(r"smollm2-135m \[0, 30\) kernels")
        child.expect(r"p2pinfer\.shards: loaded smollm2-135m layers \[0, 30\) in")
    finally:
        child.sendintr()
        child.expect(pexpect.EOF, timeout=60)
        child.close()
    lines = _plain_lines((tmp_path / "pty.log").read_text())
    assert any(ln.startswith(f"{MODEL} [0, 30) weights") and BAR in ln for ln in lines), lines
    assert any(re.fullmatch(r"\S+ \S+ INFO +p2pinfer\.agent: agent \S+ up: .*", ln) for ln in lines), lines
