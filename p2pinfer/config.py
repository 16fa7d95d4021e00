"""One Settings object: defaults < config file (TOML) < environment (P2PINFER_*) < flags."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_HTTP_PORT = 52415
DEFAULT_MODEL = "smollm2-135m"


class ConfigError(Exception):
    """A setting that cannot be used; the message is one sentence for the user."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "p2pinfer"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str | int) -> int:
    """'4G', '512M', '1.5GiB' or plain bytes; binary units, as RAM is counted."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (use e.g. 4G, 512M or bytes)")
    n, unit = float(m.group(1)), m.group(2).lower()
    return int(n * 1024 ** " kmgt".index(unit or " "))


def is_loopback_host(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True)
class Capacity:
    """How much work this peer takes on, in one group: the election reserves by it, ShardHost and each
    Shard size themselves by it, so the three never disagree."""

    sessions: int = 8  # requests one shard serves at once (a KV session each)
    kv_tokens: int = 2048  # KV the election reserves per member on top of weights; the KV size warmed at load
    max_context: int | None = None  # most tokens one session holds (prompt + answer); None: the model's context
    threads: int | None = None  # cores the engine's kernels use (None: every core this process may use)
    beam: int = 0  # tinygrad kernel search while warming (minutes once, cached; +30 % decode measured)

    def context_for(self, model_context: int) -> int:
        """Most tokens one request of a model with this context may hold here."""
        return min(model_context, self.max_context or model_context)


DEFAULT_CAPACITY = Capacity()


@dataclass
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    listen: list[str] = field(default_factory=lambda: ["/ip4/0.0.0.0/tcp/0"])
    http_host: str = "127.0.0.1"
    http_port: int = DEFAULT_HTTP_PORT
    api_key_file: Path | None = None
    cluster_secret_file: Path | None = None
    join: str | None = None
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = True
    peer_ttl: float = 6.0
    memory_limit: int | None = None
    compute: bool = True
    models_dirs: list[Path] = field(default_factory=list)
    local_models: bool = True  # False: ignore model files here, serve only weights fetched from peers
    cache_limit: int | None = None  # bytes of fetched weights kept in the data dir (LRU by model)
    upload_limit: int | None = None  # bytes per second sent to peers fetching weights
    model: str = DEFAULT_MODEL
    routing: str = "memory"  # default routing policy of a request (cluster/routing.py)
    max_requests: int = 8
    drain_timeout: float = 30.0  # seconds SIGTERM waits for in-flight requests before leaving
    threads: int | None = None  # cores the engine's kernels use (default: every core this process may use)
    sessions: int = 8  # see Capacity
    kv_tokens: int = 2048
    max_context: int | None = None
    beam: int = 0
    warm: bool = True  # load and warm the default model at start when it fits here alone
    preload: bool = True  # as a spare, pre-load a range only one peer holds (serve/spares.py)
    log_level: str = "INFO"
    allowed_hosts: list[str] = field(default_factory=list)  # Host header names answered besides our own
    cors_origins: list[str] = field(default_factory=list)  # origins whose pages may call the API

    @property
    def capacity(self) -> Capacity:
        return Capacity(self.sessions, self.kv_tokens, self.max_context, self.threads, self.beam)

    def validate(self) -> None:
        if self.peer_ttl <= 0:
            raise ConfigError("--peer-ttl must be positive")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"--http-port {self.http_port} is not a TCP port")
        if not is_loopback_host(self.http_host) and self.api_key_file is None:
            raise ConfigError(
                f"--http-host {self.http_host} is reachable beyond this machine: give --api-key-file "
                "so the endpoint is not an open door"
            )
        if "*" in self.cors_origins and self.api_key_file is None:
            raise ConfigError(
                "--cors-origin '*' lets every web page call this peer: it needs --api-key-file as well"
            )
        for o in self.cors_origins:
            if o != "*" and not re.match(r"^https?://[^/\s]+$", o):
                raise ConfigError(f"--cors-origin {o!r} must be an origin like http://host:port (no path), or *")
        if self.drain_timeout < 0:
            raise ConfigError("--drain-timeout must not be negative")
        if self.max_requests < 1:
            raise ConfigError("--max-requests must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise ConfigError("--threads must be at least 1")
        if self.sessions < 1 or self.kv_tokens < 1 or (self.max_context or 1) < 1 or self.beam < 0:
            raise ConfigError("--sessions, --kv-tokens and --max-context must be at least 1, --beam at least 0")
        from p2pinfer.cluster.routing import POLICIES

        if self.routing not in POLICIES:
            raise ConfigError(f"--routing {self.routing!r} is not one of {', '.join(POLICIES)}")


_PATHS = {"data_dir", "api_key_file", "cluster_secret_file"}
_LISTS = {"listen", "bootstrap", "models_dirs", "allowed_hosts", "cors_origins"}


def _coerce(name: str, value):
    if name in _PATHS:
        return Path(value).expanduser() if value not in (None, "") else None
    if name == "models_dirs":
        return [Path(v).expanduser() for v in value]
    if name in ("memory_limit", "cache_limit", "upload_limit"):
        return parse_size(value) if value not in (None, "") else None
    if name == "http_port":
        return int(value)
    if name in ("peer_ttl", "drain_timeout"):
        return float(value)
    if name in ("max_requests", "threads", "sessions", "kv_tokens", "max_context", "beam"):
        return int(value) if value not in (None, "") else None
    if name in ("mdns", "compute", "warm", "preload", "local_models") and isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return value


def load_settings(overrides: dict, config_file: Path | None = None, env=os.environ) -> Settings:
    """Build Settings from the layers; `overrides` holds only the flags the user actually gave."""
    s = Settings()
    names = {f.name for f in fields(Settings)}
    layers: list[dict] = []
    if config_file is not None:
        try:
            layers.append({k.replace("-", "_"): v for k, v in tomllib.loads(config_file.read_text()).items()})
        except OSError as e:
            raise ConfigError(f"cannot read config file {config_file}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {config_file} is not valid TOML: {e}") from e
        unknown = set(layers[0]) - names
        if unknown:
            raise ConfigError(f"config file {config_file} has unknown settings: {', '.join(sorted(unknown))}")
    envs = {}
    for name in names:
        v = env.get("P2PINFER_" + name.upper())
        if v is not None:
            envs[name] = v.split(",") if name in _LISTS else v
    layers += [envs, overrides]
    try:
        for layer in layers:
            for k, v in layer.items():
                setattr(s, k, _coerce(k, v))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad setting: {e}") from e
    s.validate()
    return s
