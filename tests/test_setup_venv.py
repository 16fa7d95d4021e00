"""`make run` / `make test` install into a project virtualenv, never into the system Python (PEP 668).

The slow test runs .ci/setup.sh against Debian's own /usr/bin/python3 in a scratch copy of the tree,
as a new user on Debian 12 or Ubuntu 24.04 would; the fast one checks the sentence a user gets when
the interpreter has no venv module (Debian's python3 without python3-venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_PYTHON = Path("/usr/bin/python3")


def _scratch_copy(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")  # fmt: skip
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def _system_has_apt_deps() -> bool:
    ok = subprocess.run(["dpkg-query", "-W", "clang", "libgmp-dev", "gcc", "iproute2", "libllvm19"],
                        capture_output=True)  # fmt: skip
    return ok.returncode == 0


def test_interpreter_without_venv_module_gets_one_clear_sentence(tmp_path):
    if shutil.which("dpkg-query") is None or not _system_has_apt_deps():
        pytest.skip("needs the Debian packages setup.sh installs already present (no apt-get from this test)")
    # a python3 whose venv/ensurepip are missing, as Debian's python3 without python3-venv
    shim = tmp_path / "shim"
    for mod in ("ensurepip", "venv"):
        (shim / mod).mkdir(parents=True)
        (shim / mod / "__init__.py").write_text("raise ImportError('not installed')\n")
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\nPYTHONPATH={shim} exec {DEBIAN_PYTHON if DEBIAN_PYTHON.exists() else "python3"} "$@"\n')
    fake.chmod(0o755)
    tree = _scratch_copy(tmp_path / "tree")
    r = subprocess.run(["bash", ".ci/setup.sh", "run"], cwd=tree, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHON": str(fake), "VENV": str(tmp_path / "venv")})  # fmt: skip
    assert r.returncode != 0
    assert "cannot create a virtualenv" in r.stderr and "apt-get install python3" in r.stderr, r.stderr
    assert not (tmp_path / "venv").exists()


@pytest.mark.slow
def test_setup_with_debians_python_uses_a_venv(tmp_path):
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no /usr/bin/python3 here (not a Debian/Ubuntu system Python)")
    if subprocess.run([DEBIAN_PYTHON, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"]).returncode:
        pytest.skip("/usr/bin/python3 is older than 3.11")
    tree = _scratch_copy(tmp_path / "tree")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    # PATH puts Debian's python3 first: the setup must find it on its own, as on a fresh machine
    env["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin"
    env.pop("VENV", None)
    r = subprocess.run(["bash", ".ci/setup.sh", "run"], cwd=tree, capture_output=True, text=True, timeout=1500,
                       env=env)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    venv_py = tree / ".venv" / "bin" / "python"
    cfg = (tree / ".venv" / "pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg, cfg
    out = subprocess.run([venv_py, "-m", "p2pinfer", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("p2pinfer "), out
    found = subprocess.run([venv_py, "-c", "from p2pinfer.engine.catalog import embedded_model_path as e; "
                            "print(e())"], capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert found.stdout.strip().endswith(".gguf"), found
    # nothing went into the system interpreter
    sys_import = subprocess.run([DEBIAN_PYTHON, "-c", "import p2pinfer"], capture_output=True, cwd=tmp_path)
    assert sys_import.returncode != 0
    # a second run changes nothing and reuses the venv
    again = subprocess.run(["bash", ".ci/setup.sh", "run"], cwd=tree, capture_output=True, text=True,
                           timeout=900, env=env)  # fmt: skip
    assert again.returncode == 0 and "creating the virtualenv" not in again.stdout, again.stdout
