"""Helpers shared by the deploy tests: run nix offline, render and judge systemd units."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAX_EXPOSURE = 3.0


def need(tool: str, package: str) -> str:
    """Path of a tool, or skip the test with the package that provides it."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (Debian package {package})")
    return path


def nix_env(tmp: Path) -> dict[str, str]:
    """Environment for nix-instantiate without a daemon or a writable /nix, as root or not."""
    import os

    env = dict(os.environ)
    for name in ("NIX_STATE_DIR", "NIX_LOG_DIR", "NIX_CONF_DIR"):
        d = tmp / name.lower()
        d.mkdir(exist_ok=True)
        env[name] = str(d)
    env["HOME"] = str(tmp)
    env.pop("NIX_REMOTE", None)
    env.pop("NIX_PATH", None)
    return env


def nix_instantiate(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    need("nix-instantiate", "nix-bin")
    # dummy:// is a store that holds nothing: evaluation never needs to write to /nix.
    cmd = ["nix-instantiate", "--store", "dummy://", "--readonly-mode", *args]
    return subprocess.run(cmd, env=nix_env(tmp), capture_output=True, text=True, timeout=120)


def eval_module(tmp: Path, config: str) -> subprocess.CompletedProcess[str]:
    """Evaluate nix/module.nix with `config` (a NixOS module in Nix syntax); the caller checks rc."""
    import os

    cfg = tmp / "config.nix"
    cfg.write_text(config)
    args = [
        "--eval",
        "--strict",
        "--json",
        str(REPO / "tests/nix/eval.nix"),
        "--argstr",
        "configFile",
        str(cfg),
    ]
    lib = os.environ.get("NIXPKGS_LIB")
    if lib:
        args += ["--argstr", "libPath", lib]
    return nix_instantiate(tmp, *args)


def eval_module_ok(tmp: Path, config: str) -> dict:
    proc = eval_module(tmp, config)
    assert proc.returncode == 0, f"nix-instantiate failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


def _ini_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def render_nixos_unit(service: dict) -> str:
    """Render systemd.services.<name> as NixOS does, near enough (lists become repeated keys)."""
    lines = ["[Unit]", f"Description={service['description']}"]
    for key, attr in (("Wants", "wants"), ("After", "after")):
        for v in service.get(attr, []):
            lines.append(f"{key}={v}")
    for k, v in sorted(service.get("unitConfig", {}).items()):
        lines += [f"{k}={_ini_value(x)}" for x in (v if isinstance(v, list) else [v])]
    lines.append("")
    lines.append("[Service]")
    for k, v in sorted(service.get("environment", {}).items()):
        lines.append(f'Environment="{k}={v}"')
    for k, v in sorted(service["serviceConfig"].items()):
        lines += [f"{k}={_ini_value(x)}" for x in (v if isinstance(v, list) else [v])]
    lines += ["", "[Install]"] + [f"WantedBy={t}" for t in service.get("wantedBy", [])]
    return "\n".join(lines) + "\n"


def verify_unit(unit: Path) -> None:
    """systemd-analyze verify exits 0 even on errors: its stderr must be empty."""
    need("systemd-analyze", "systemd")
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stderr.strip() == "", (
        f"systemd-analyze verify {unit} (rc {proc.returncode}):\n{proc.stderr}\n--- unit ---\n{unit.read_text()}"
    )


def exposure(unit: Path) -> float:
    need("systemd-analyze", "systemd")
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"systemd-analyze security failed ({proc.returncode}):\n{proc.stderr}"
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    assert m, f"no exposure level in:\n{proc.stdout}"
    return float(m.group(1))
