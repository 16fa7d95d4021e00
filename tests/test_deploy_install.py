"""bootstrap/install.sh into a temporary prefix, with systemd not running (never enabling a unit).

The script runs from a copy of the checkout, so edits elsewhere in the tree during the test
cannot change its source fingerprint between two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.nix.systemd_check import MAX_EXPOSURE, REPO, exposure, need, verify_unit

VERSION = re.search(r'__version__ = "([^"]+)"', (REPO / "p2pinfer/__init__.py").read_text()).group(1)
SYSTEMD_BOOTED = Path("/run/systemd/system").is_dir()


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / "p2pinfer", root / "p2pinfer", ignore=ignore)
    shutil.copytree(REPO / "bootstrap", root / "bootstrap", ignore=ignore)
    return root


def run_install(checkout: Path, *args: str, env: dict | None = None, check: bool = True):
    need("bash", "bash")
    proc = subprocess.run(
        ["bash", str(checkout / "bootstrap/install.sh"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert proc.returncode == 0, (
            f"install.sh {shlex.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under roots with its mode, mtime and content hash: a second run must keep all."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames + [""]:
                p = Path(dirpath, name)
                st = p.lstat()
                digest = (
                    hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else ""
                )
                out[str(p)] = (st.st_mode, st.st_mtime_ns, st.st_size, digest)
    return out


def unit_lines(unit: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(key + "=")]


def check_venv(prefix: Path) -> None:
    proc = subprocess.run(
        [str(prefix / "venv/bin/p2pinfer"), "--version"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert VERSION in proc.stdout + proc.stderr


def assert_empty(*dirs: Path) -> None:
    for d in dirs:
        assert not d.exists() or list(d.iterdir()) == [], f"{d} still holds {sorted(os.listdir(d))}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnitAgent:
    """Run the agent with the unit's ExecStart as systemd would, kept on loopback.

    Specifiers and variables are filled in the way systemd would (%S state, %d credentials,
    EnvironmentFile variables); addresses move to 127.0.0.1 and mDNS is off (multicast must not
    leave this machine)."""

    def __init__(self, unit: Path, root: Path):
        self.root = root
        state, creds = root / "state", root / "creds"
        state.mkdir(parents=True)
        creds.mkdir()
        text = unit.read_text()
        for spec in unit_lines(unit, "LoadCredential"):
            name, path = spec.split(":", 1)
            shutil.copy(path, creds / name)
        env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}
        for envfile in unit_lines(unit, "EnvironmentFile"):
            for line in Path(envfile).read_text().splitlines():
                k, v = line.split("=", 1)
                env[k] = v
        argv = []
        for a in shlex.split(unit_lines(unit, "ExecStart")[0]):
            a = a.replace("%S", str(state)).replace("%d", str(creds)).replace("%%", "%")
            a = re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a)
            argv.append(a)
        assert "ExecStart" in text and argv[1] == "run"
        self.port = free_port()
        for flag, value in (
            ("--listen", "/ip4/127.0.0.1/tcp/0"),
            ("--http-host", "127.0.0.1"),
            ("--http-port", str(self.port)),
        ):
            argv[argv.index(flag) + 1] = value
        self.argv = [*argv, "--no-mdns"]
        self.data_dir = state / "p2pinfer"
        self.log = (root / "agent.log").open("w")
        self.proc = subprocess.Popen(
            self.argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

    def get(self, path: str, key: str | None = None, timeout: float = 60.0) -> dict:
        import urllib.request

        headers = {"Authorization": f"Bearer {key}"} if key else {}
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (
                f"agent exited {self.proc.returncode}:\n{(self.root / 'agent.log').read_text()}"
            )
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers=headers)
                with urllib.request.urlopen(req, timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> int:
        """SIGTERM, as systemctl stop sends it: the agent must leave and exit 0."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.log.close()


@pytest.fixture
def agents():
    """Agents a test starts; any still running at the end (a failed test) are killed."""
    started: list[UnitAgent] = []
    yield started
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(timeout=10)


def test_install_reinstall_reconfigure_uninstall(checkout, tmp_path, agents):
    # --system-site-packages reuses the dependencies of the interpreter running the tests (CI
    # installs them), so this test stays fast; test_full_install builds an isolated venv.
    prefix, units = tmp_path / "opt", tmp_path / "units"
    base = ["--prefix", str(prefix), "--unit-dir", str(units), "--system-site-packages", "--no-model"]

    first = run_install(checkout, *base, "--no-enable")
    assert "installing p2pinfer from" in first.stdout
    check_venv(prefix)
    unit = units / "p2pinfer.service"
    verify_unit(unit)
    assert exposure(unit) <= MAX_EXPOSURE
    argv = shlex.split(unit_lines(unit, "ExecStart")[0])
    assert argv == [
        str(prefix / "venv/bin/p2pinfer"), "run", "--data-dir", "%S/p2pinfer",
        "--listen", "/ip4/0.0.0.0/tcp/52416", "--http-host", "127.0.0.1", "--http-port", "52415",
    ]  # fmt: skip
    assert unit_lines(unit, "Restart") == ["on-failure"]
    assert unit_lines(unit, "DynamicUser") == ["yes"]
    assert not (prefix / "etc").exists()  # loopback HTTP: no API key needed

    # Same arguments again: nothing is rewritten, not even a timestamp.
    before = snapshot(prefix, units)
    again = run_install(checkout, *base, "--no-enable")
    assert "already installed" in again.stdout
    assert snapshot(prefix, units) == before

    # The unit's command line runs the agent (as the service would), which invites a second one.
    first_agent = UnitAgent(unit, tmp_path / "agent-a")
    agents.append(first_agent)
    assert first_agent.get("/health")
    invite = subprocess.run(
        [str(prefix / "venv/bin/p2pinfer"), "invite", "--data-dir", str(first_agent.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert invite.returncode == 0, invite.stderr
    token = invite.stdout.strip().splitlines()[-1]

    # Joining a cluster with a public API: secrets land under PREFIX/etc (0600) and reach the
    # service as credentials; the token is not in the world-readable unit.
    secret = tmp_path / "secret"
    secret.write_text("ab" * 32 + "\n")
    join = [
        *base, "--join", token, "--http-host", "0.0.0.0", "--p2p-port", "4001",
        "--cluster-secret-file", str(secret), "--memory-limit", "2G", "--models-dir", "/srv/models",
    ]  # fmt: skip
    out = run_install(checkout, *join, "--no-enable")
    assert "generated an API key" in out.stdout
    etc = prefix / "etc"
    for name in ("api-key", "cluster-secret", "join.env"):
        assert (etc / name).stat().st_mode & 0o777 == 0o600, name
    assert (etc / "join.env").read_text() == f"P2PINFER_JOIN={token}\n"
    assert token not in unit.read_text()
    assert sorted(unit_lines(unit, "LoadCredential")) == [
        f"api-key:{etc}/api-key",
        f"cluster-secret:{etc}/cluster-secret",
    ]
    assert unit_lines(unit, "EnvironmentFile") == [f"{etc}/join.env"]
    assert unit_lines(unit, "BindReadOnlyPaths") == ["-/srv/models"]
    argv = shlex.split(unit_lines(unit, "ExecStart")[0])
    assert argv[1:] == [
        "run", "--data-dir", "%S/p2pinfer", "--listen", "/ip4/0.0.0.0/tcp/4001",
        "--http-host", "0.0.0.0", "--http-port", "52415", "--api-key-file", "%d/api-key",
        "--cluster-secret-file", "%d/cluster-secret", "--join", "${P2PINFER_JOIN}",
        "--memory-limit", "2G", "--models-dir", "/srv/models",
    ]  # fmt: skip
    verify_unit(unit)
    assert exposure(unit) <= MAX_EXPOSURE
    before = snapshot(prefix, units)
    run_install(checkout, *join, "--no-enable")
    assert snapshot(prefix, units) == before

    # The joined agent, started from this unit, sees the first one.
    second_agent = UnitAgent(unit, tmp_path / "agent-b")
    agents.append(second_agent)
    api_key = (etc / "api-key").read_text().strip()
    a_id = first_agent.get("/health")["peer_id"]
    deadline = time.monotonic() + 30
    while a_id not in json.dumps(second_agent.get("/v1/cluster", api_key)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert a_id in json.dumps(second_agent.get("/v1/cluster", api_key))
    assert second_agent.stop() == 0
    assert first_agent.stop() == 0

    # Back to the plain settings: the secrets of the earlier run are removed.
    run_install(checkout, *base, "--no-enable")
    assert not etc.exists()
    assert "LoadCredential" not in unit.read_text()

    # Without --no-enable and without systemd, the unit is written and the script says why it
    # did not enable it. (Skipped where systemd runs: a test must not enable a real service.)
    if not SYSTEMD_BOOTED:
        out = run_install(checkout, *base)
        assert "systemd is not running here" in out.stdout

    gone = run_install(checkout, "--prefix", str(prefix), "--unit-dir", str(units), "--uninstall")
    assert "uninstalled" in gone.stdout
    assert_empty(prefix, units)


def test_user_unit(checkout, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    prefix = home / ".local/opt/p2pinfer"
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    run_install(checkout, "--user", "--system-site-packages", "--no-model", "--no-enable", env=env)
    check_venv(prefix)
    unit = home / ".config/systemd/user/p2pinfer.service"
    assert unit_lines(unit, "WantedBy") == ["default.target"]
    assert "DynamicUser" not in unit.read_text()
    verify_unit(unit)
    run_install(checkout, "--user", "--uninstall", env=env)
    assert not prefix.exists() and not unit.exists()


def test_clear_errors(checkout, tmp_path):
    prefix = tmp_path / "opt"
    common = ["--prefix", str(prefix), "--unit-dir", str(tmp_path / "units"), "--no-enable"]

    bad = run_install(checkout, "--frobnicate", check=False)
    assert bad.returncode != 0 and "unknown argument: --frobnicate" in bad.stderr

    nopy = run_install(checkout, *common, "--python", str(tmp_path / "no-python3"), check=False)
    assert nopy.returncode != 0 and "no Python >= 3.11 found" in nopy.stderr
    assert not prefix.exists()  # checks come before anything is written

    nothing = run_install(checkout, *common, "--uninstall", check=False)
    assert nothing.returncode != 0 and "no p2pinfer install found" in nothing.stderr

    # No route to the package index: pip fails and the script says why.
    offline = {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_TIMEOUT": "2",
    }
    net = run_install(checkout, *common, "--source", "p2pinfer-not-a-package==9.9", env=offline, check=False)
    assert net.returncode != 0 and "cannot reach the package index" in net.stderr, net.stderr


@pytest.mark.slow
def test_full_install(checkout, tmp_path):
    """An isolated venv (every dependency from the index) with the embedded model."""
    prefix, units = tmp_path / "opt", tmp_path / "units"
    run_install(checkout, "--prefix", str(prefix), "--unit-dir", str(units), "--no-enable")
    check_venv(prefix)
    ggufs = list((prefix / "venv").rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert len(ggufs) == 1 and ggufs[0].stat().st_size == 98_362_432
    verify_unit(units / "p2pinfer.service")
    run_install(checkout, "--prefix", str(prefix), "--unit-dir", str(units), "--uninstall")
    assert_empty(prefix, units)


def test_install_sh_is_clean_shell():
    script = str(REPO / "bootstrap/install.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True, text=True).returncode == 0
    need("shellcheck", "shellcheck")
    proc = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
