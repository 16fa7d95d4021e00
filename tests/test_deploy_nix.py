"""The flake, package and NixOS module services.p2pinfer, evaluated offline.

nixpkgs cannot be fetched here, so the module is evaluated with tests/nix/lib.nix (a small
module system) unless NIXPKGS_LIB names a real nixpkgs lib directory.
"""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

import pytest

from tests.nix.systemd_check import (
    MAX_EXPOSURE,
    REPO,
    eval_module,
    eval_module_ok,
    exposure,
    nix_instantiate,
    render_nixos_unit,
    verify_unit,
)

NIX_FILES = sorted([REPO / "flake.nix", *(REPO / "nix").glob("*.nix"), *(REPO / "tests/nix").glob("*.nix")])


def fake_package(tmp: Path) -> str:
    """A stand-in derivation whose bin/p2pinfer exists, so systemd-analyze can check ExecStart."""
    out = tmp / "p2pinfer-pkg"
    (out / "bin").mkdir(parents=True)
    exe = out / "bin/p2pinfer"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return f'{{ type = "derivation"; name = "p2pinfer-test"; outPath = "{out}"; }}'


def config(tmp: Path, body: str) -> str:
    return f"""{{ ... }}: {{
  services.p2pinfer = {{
    enable = true;
    package = {fake_package(tmp)};
    {body}
  }};
}}
"""


FULL = """
    httpHost = "0.0.0.0";
    httpPort = 8080;
    p2pPort = 4001;
    apiKeyFile = "/run/keys/p2pinfer-api-key";
    clusterSecretFile = "/run/keys/p2pinfer-secret";
    modelsDir = "/srv/models";
    bootstrapPeers = [ "/ip4/192.168.1.10/tcp/4001/p2p/12D3KooWabc" "/ip4/192.168.1.11/tcp/4001" ];
    memoryLimit = "4G";
    openFirewall = true;
    extraArgs = [ "--log-level" "debug" "--no-mdns" ];
"""


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_nix_file_parses(tmp_path, path):
    proc = nix_instantiate(tmp_path, "--parse", str(path))
    assert proc.returncode == 0, proc.stderr


def test_full_configuration(tmp_path):
    out = eval_module_ok(tmp_path, config(tmp_path, FULL))
    assert out["failedAssertions"] == []
    sc = out["service"]["serviceConfig"]

    argv = shlex.split(sc["ExecStart"])
    assert argv[0] == str(tmp_path / "p2pinfer-pkg/bin/p2pinfer")
    assert argv[1] == "run"
    expected = [
        "--data-dir", "/var/lib/p2pinfer",
        "--listen", "/ip4/0.0.0.0/tcp/4001",
        "--http-host", "0.0.0.0",
        "--http-port", "8080",
        "--models-dir", "/srv/models",
        "--bootstrap", "/ip4/192.168.1.10/tcp/4001/p2p/12D3KooWabc",
        "--bootstrap", "/ip4/192.168.1.11/tcp/4001",
        "--memory-limit", "4G",
        "--log-level", "debug", "--no-mdns",
        "--cluster-secret-file", "%d/cluster-secret",
        "--api-key-file", "%d/api-key",
    ]  # fmt: skip
    assert argv[2:] == expected

    # Secrets reach the service only as credentials read from their own paths.
    assert sorted(sc["LoadCredential"]) == sorted(
        ["cluster-secret:/run/keys/p2pinfer-secret", "api-key:/run/keys/p2pinfer-api-key"]
    )
    assert "/run/keys" not in sc["ExecStart"]

    fw = out["firewall"]
    assert sorted(fw["allowedTCPPorts"]) == [4001, 8080]
    assert sorted(fw["allowedUDPPorts"]) == [5353]

    assert out["users"]["p2pinfer"]["isSystemUser"] is True
    assert sc["User"] == "p2pinfer" and "p2pinfer" in out["groups"]
    assert sc["StateDirectory"] == "p2pinfer"
    assert sc["BindReadOnlyPaths"] == ["-/srv/models"]
    assert "MemoryDenyWriteExecute" not in sc  # tinygrad executes the kernels it compiles
    assert out["service"]["environment"]["XDG_CACHE_HOME"] == "/var/cache/p2pinfer"
    assert out["service"]["wantedBy"] == ["multi-user.target"]


def test_defaults_loopback_firewall(tmp_path):
    out = eval_module_ok(tmp_path, config(tmp_path, "openFirewall = true;"))
    assert out["failedAssertions"] == []
    sc = out["service"]["serviceConfig"]
    argv = shlex.split(sc["ExecStart"])
    assert argv[1:] == [
        "run", "--data-dir", "/var/lib/p2pinfer", "--listen", "/ip4/0.0.0.0/tcp/52416",
        "--http-host", "127.0.0.1", "--http-port", "52415",
    ]  # fmt: skip
    assert sc["LoadCredential"] == []
    # The HTTP port stays closed while the API listens on loopback only.
    assert sorted(out["firewall"]["allowedTCPPorts"]) == [52416]
    assert sorted(out["firewall"]["allowedUDPPorts"]) == [5353]


def test_firewall_closed_unless_asked(tmp_path):
    out = eval_module_ok(tmp_path, config(tmp_path, 'httpHost = "0.0.0.0"; apiKeyFile = "/run/k";'))
    assert out["firewall"] == {"allowedTCPPorts": [], "allowedUDPPorts": []}


def test_disabled_defines_nothing(tmp_path):
    out = eval_module_ok(tmp_path, "{ ... }: { services.p2pinfer.httpPort = 1234; }")
    assert out["service"] is None
    assert out["users"] == {} and out["groups"] == []
    assert out["firewall"] == {"allowedTCPPorts": [], "allowedUDPPorts": []}


def test_data_dir_outside_var_lib(tmp_path):
    out = eval_module_ok(tmp_path, config(tmp_path, 'dataDir = "/srv/p2pinfer";'))
    sc = out["service"]["serviceConfig"]
    assert "StateDirectory" not in sc
    assert sc["ReadWritePaths"] == ["/srv/p2pinfer"]
    assert out["tmpfiles"] == ["d /srv/p2pinfer 0700 p2pinfer p2pinfer - -"]
    assert shlex.split(sc["ExecStart"])[2:4] == ["--data-dir", "/srv/p2pinfer"]


@pytest.mark.parametrize("option", ["clusterSecretFile", "apiKeyFile"])
def test_store_path_secret_refused(tmp_path, option):
    body = f'{option} = "/nix/store/0000000000000000000000000000000a-secret";'
    out = eval_module_ok(tmp_path, config(tmp_path, body))
    assert any(
        f"services.p2pinfer.{option} must not be in the Nix store" in m for m in out["failedAssertions"]
    )


def test_public_http_needs_api_key(tmp_path):
    out = eval_module_ok(tmp_path, config(tmp_path, 'httpHost = "0.0.0.0";'))
    assert any("apiKeyFile must be set" in m for m in out["failedAssertions"])


def test_percent_in_values_is_not_a_specifier(tmp_path):
    out = eval_module_ok(tmp_path, config(tmp_path, 'extraArgs = [ "--models-dir" "/srv/100%" ];'))
    assert shlex.split(out["service"]["serviceConfig"]["ExecStart"])[-1] == "/srv/100%%"


@pytest.mark.parametrize(
    ("body", "option"),
    [
        ('httpPort = "8080";', "services.p2pinfer.httpPort"),
        ("p2pPort = 70000;", "services.p2pinfer.p2pPort"),
        ("openFirewall = 1;", "services.p2pinfer.openFirewall"),
        ('bootstrapPeers = "/ip4/1.2.3.4/tcp/1";', "services.p2pinfer.bootstrapPeers"),
        ('memoryLimit = "lots";', "services.p2pinfer.memoryLimit"),
    ],
)
def test_wrong_type_rejected(tmp_path, body, option):
    proc = eval_module(tmp_path, config(tmp_path, body))
    assert proc.returncode != 0, f"accepted: {body}\n{proc.stdout}"
    assert "is not of type" in proc.stderr and option in proc.stderr, proc.stderr


def test_unknown_option_rejected(tmp_path):
    proc = eval_module(tmp_path, config(tmp_path, "httpPorts = 8080;"))
    assert proc.returncode != 0, proc.stdout
    assert "services.p2pinfer.httpPorts' does not exist" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "body", ["", FULL, 'dataDir = "/srv/p2pinfer";'], ids=["defaults", "full", "datadir"]
)
def test_rendered_unit_verifies_and_is_hardened(tmp_path, body):
    out = eval_module_ok(tmp_path, config(tmp_path, body))
    unit = tmp_path / "p2pinfer.service"
    unit.write_text(render_nixos_unit(out["service"]))
    verify_unit(unit)
    score = exposure(unit)
    assert score <= MAX_EXPOSURE, f"exposure {score} > {MAX_EXPOSURE}"


def test_module_hardening_matches_install_sh_unit(tmp_path):
    """The NixOS unit and the unit install.sh writes carry the same hardening settings."""
    template = (REPO / "bootstrap/p2pinfer.service.in").read_text()
    block = template.split("# Hardening", 1)[1].split("[Install]", 1)[0]
    wanted: dict[str, list[str]] = {}
    for line in block.splitlines()[1:]:
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            wanted.setdefault(key, []).append(value)
    assert len(wanted) >= 25

    sc = eval_module_ok(tmp_path, config(tmp_path, ""))["service"]["serviceConfig"]

    def norm(v) -> list[str]:
        vals = v if isinstance(v, list) else [v]
        return [{True: "yes", False: "no"}.get(x, x) if isinstance(x, bool) else str(x) for x in vals]

    for key, values in wanted.items():
        have = norm(sc.get(key, []))
        if key == "RestrictAddressFamilies":
            have = [" ".join(have)]
        assert have == values, f"{key}: module {have} != install.sh unit {values}"


def test_flake_outputs(tmp_path):
    """The flake's outputs, with a stand-in nixpkgs: every output the issue asks for is there."""
    expr = f"""
      let
        flake = import {REPO}/flake.nix;
        nixpkgs = {{
          lib.genAttrs = names: f: builtins.listToAttrs (map (n: {{ name = n; value = f n; }}) names);
          legacyPackages = builtins.listToAttrs (map (s: {{ name = s; value = {{ marker = s; }}; }})
            [ "x86_64-linux" "aarch64-linux" ]);
        }};
        out = flake.outputs {{ self = out; inherit nixpkgs; }};
      in {{
        inputs = builtins.attrNames flake.inputs;
        outputs = builtins.attrNames out;
        packages = builtins.attrNames out.packages.x86_64-linux;
        apps = builtins.attrNames out.apps.aarch64-linux;
        devShells = builtins.attrNames out.devShells.x86_64-linux;
        modules = builtins.attrNames out.nixosModules;
      }}
    """
    proc = nix_instantiate(tmp_path, "--eval", "--strict", "--json", "--expr", expr)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["inputs"] == ["nixpkgs"]
    assert {"packages", "apps", "nixosModules", "devShells"} <= set(got["outputs"])
    assert got["packages"] == ["default", "p2pinfer"]
    assert got["apps"] == ["default", "p2pinfer"]
    assert got["devShells"] == ["default"]
    assert "default" in got["modules"]


def test_readme_example_configuration(tmp_path):
    """nix/example.nix (the README's example) evaluates, passes its assertions, and verifies."""
    body = f"""{{ ... }}: {{
  imports = [ {REPO}/nix/example.nix ];
  services.p2pinfer.package = {fake_package(tmp_path)};
}}
"""
    out = eval_module_ok(tmp_path, body)
    assert out["failedAssertions"] == []
    assert sorted(out["firewall"]["allowedTCPPorts"]) == [52415, 52416]
    argv = shlex.split(out["service"]["serviceConfig"]["ExecStart"])
    assert argv[argv.index("--memory-limit") + 1] == "6G"
    unit = tmp_path / "p2pinfer.service"
    unit.write_text(render_nixos_unit(out["service"]))
    verify_unit(unit)
