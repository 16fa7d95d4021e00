"""Command line: parse arguments, then hand over to the agent or a small command. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from p2pinfer import __version__
from p2pinfer.config import ConfigError, load_settings

log = logging.getLogger("p2pinfer")


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="run the agent on this device", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", type=Path, help="TOML file of settings (flags override it)")
    p.add_argument(
        "--data-dir", type=Path, help="key, cluster secret and state (default ~/.local/share/p2pinfer)"
    )
    p.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        help="p2p listen address, repeatable (default /ip4/0.0.0.0/tcp/0)",
    )
    p.add_argument("--http-host", help="HTTP bind host (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, help="HTTP port (default 52415)")
    p.add_argument("--api-key-file", type=Path, help="file holding the API key (required beyond loopback)")
    p.add_argument("--cluster-secret-file", type=Path, help="file holding the cluster secret (64 hex chars)")
    p.add_argument("--join", metavar="TOKEN", help="join the cluster of a `p2pinfer invite` token")
    p.add_argument("--bootstrap", action="append", metavar="MULTIADDR", help="peer to dial, repeatable")
    p.add_argument("--no-mdns", dest="mdns", action="store_false", help="no mDNS discovery on the LAN")
    p.add_argument(
        "--peer-ttl", type=float, help="seconds of silence before a peer leaves the view (default 6)"
    )
    p.add_argument("--memory-limit", help="cap on the memory offered to the cluster, e.g. 4G, 512M")
    p.add_argument(
        "--no-compute",
        dest="compute",
        action="store_false",
        help="gateway only: serve the API, hold no layers",
    )
    p.add_argument("--no-local-models", dest="local_models", action="store_false",
                   help="ignore model files here (the embedded one, --models-dir): serve only weights fetched "
                        "from peers")  # fmt: skip
    p.add_argument("--cache-limit", help="cap on the weights fetched from peers kept in the data dir, e.g. 2G "
                                         "(least recently used models go first; default: no cap)")  # fmt: skip
    p.add_argument("--upload-limit", help="cap on the bytes per second this peer sends to peers fetching weights, "
                                          "e.g. 50M (default: 20 MiB/s while this peer serves a ring, else no cap)")  # fmt: skip
    p.add_argument(
        "--models-dir",
        dest="models_dirs",
        action="append",
        type=Path,
        help="directory scanned for GGUF files and HF model directories, repeatable",
    )
    p.add_argument("--model", help="default model (default smollm2-135m)")
    p.add_argument("--routing", help="default routing policy: memory, least-loaded, latency or fastest "
                   "(a request may name its own in \"p2pinfer\": {\"routing\": ...}; default memory)")  # fmt: skip
    p.add_argument("--max-requests", type=int, help="requests served at once before 429 (default 8)")
    p.add_argument("--drain-timeout", type=float,
                   help="seconds SIGTERM waits for in-flight requests before leaving (default 30)")  # fmt: skip
    p.add_argument("--threads", type=int, help="cores the engine's kernels use (default: all)")
    p.add_argument("--sessions", type=int, help="requests one shard serves at once (default 8)")
    p.add_argument("--kv-tokens", type=int, help="KV tokens the election reserves per ring member (default 2048)")
    p.add_argument("--max-context", type=int,
                   help="most tokens one request holds, prompt + answer (default: the model's context)")  # fmt: skip
    p.add_argument("--beam", type=int, help="tinygrad kernel search width while warming (default 0: none)")
    p.add_argument("--no-preload", dest="preload", action="store_false",
                   help="as a spare, do not pre-load a range that only one peer holds")  # fmt: skip
    p.add_argument("--no-warm", dest="warm", action="store_false",
                   help="do not load and warm the default model at start")  # fmt: skip
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO)")
    p.add_argument("--allowed-host", dest="allowed_hosts", action="append", metavar="NAME",
                   help="Host header name to answer besides loopback and this peer's addresses, repeatable "
                   "('*' turns the DNS rebinding guard off)")  # fmt: skip
    p.add_argument("--cors-origin", dest="cors_origins", action="append", metavar="ORIGIN",
                   help="origin (http://host:port) whose web pages may call the API, repeatable; '*' needs an API key")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="p2pinfer", description="Pool the devices on a network into one LLM server."
    )
    parser.add_argument("--version", action="version", version=f"p2pinfer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    for name, text in (
        ("id", "print this device's peer id"),
        ("invite", "print a join token for another device"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--data-dir", type=Path)
        if name == "invite":
            p.add_argument("--cluster-secret-file", type=Path)
    p = sub.add_parser("warm", help="compile the engine's kernels for a model once (cached in the data dir)")
    p.add_argument("--data-dir", type=Path)
    p.add_argument("--model", help="model to warm (default smollm2-135m)")
    p.add_argument("--models-dir", dest="models_dirs", action="append", type=Path)
    p.add_argument("--threads", type=int, help="cores the kernels will run on (default: all)")
    for flag, text in (("--kv-tokens", "KV size to warm (as `run --kv-tokens`)"),
                       ("--max-context", "as `run --max-context`"), ("--beam", "as `run --beam`")):  # fmt: skip
        p.add_argument(flag, type=int, help=text)
    _client_parsers(sub)
    return parser


def _client_parsers(sub) -> None:
    for name, text in (("chat", "chat with the cluster in the terminal"), ("status", "table of the cluster's peers")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--url", help="a peer's HTTP endpoint (default: the local agent's, else http://127.0.0.1:52415)")
        p.add_argument("--api-key-file", type=Path, help="file holding the API key (or set P2PINFER_API_KEY)")
        p.add_argument("--data-dir", type=Path, help="where the local agent recorded its HTTP address")
        if name == "status":
            p.add_argument("--watch", nargs="?", type=float, const=1.0, metavar="SECONDS",
                           help="redraw every SECONDS (default 1) until Ctrl-C")  # fmt: skip
            continue
        p.add_argument("--model", help="model to chat with (default: the first the cluster serves)")
        p.add_argument("--system", help="system prompt")
        for field, kind in (("temperature", float), ("top-p", float), ("top-k", int), ("min-p", float),
                            ("max-tokens", int), ("seed", int), ("repetition-penalty", float)):  # fmt: skip
            p.add_argument(f"--{field}", type=kind, help="(default: the model's recommended value)"
                           if field != "max-tokens" and field != "seed" else None)  # fmt: skip


def _cmd_client(args: argparse.Namespace) -> int:
    from p2pinfer.console import Chat, ChatSession, ClientError, Peer, default_url, read_key, run_status

    try:
        peer = Peer(args.url or default_url(args.data_dir), read_key(args.api_key_file))
        if args.command == "status":
            return run_status(peer, args.watch)
        sampling = {k: v for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed",
                                   "repetition_penalty") if (v := getattr(args, k)) is not None}  # fmt: skip
        history = (args.data_dir or load_settings({}).data_dir) / "chat_history"
        return Chat(ChatSession(peer, args.model, sampling, args.system), history_file=history).run()
    except ClientError as e:
        print(f"p2pinfer: {e}", file=sys.stderr)
        return 1


def _cmd_run(args: argparse.Namespace) -> int:
    from p2pinfer.engine import configure
    from p2pinfer.logs import setup_logging

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    settings = load_settings(overrides, getattr(args, "config", None))
    setup_logging(settings.log_level)
    configure(kernel_cache_dir=settings.data_dir)  # the engine's backend, before the agent imports tinygrad
    from p2pinfer.agent import run_agent

    run_agent(settings)
    return 0


def _cmd_warm(args: argparse.Namespace) -> int:
    """Load the model whole, capture and compile its steps, exit: later agent starts find the kernels cached."""
    import time

    from p2pinfer.logs import setup_logging

    overrides = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    settings = load_settings(overrides)
    setup_logging(settings.log_level)
    from p2pinfer.engine import configure

    configure(kernel_cache_dir=settings.data_dir)  # before anything imports tinygrad
    from p2pinfer.engine import EngineError, ModelCatalog, Shard
    from p2pinfer.engine.device import use_kernel_cache
    from p2pinfer.progress import Bars, LoadProgress

    cache = use_kernel_cache(settings.data_dir)
    try:
        entry = ModelCatalog(settings.models_dirs).get(settings.model)
        t0 = time.monotonic()
        key, tracker = (entry.name, 0, entry.n_layers), LoadProgress()
        with Bars() as bars:  # on a terminal only: weights read, kernels warmed
            report = tracker.reporter(key)

            def progress(stage: str, done: int, total: int) -> None:
                report(stage, done, total)
                bars.show(tracker.snapshot())

            cap = settings.capacity  # as the agent loads it, so the agent finds these kernels
            shard = Shard.load(entry, 0, entry.n_layers, max_sessions=cap.sessions, threads=cap.threads,
                               max_context=cap.context_for(entry.context_length), beam=cap.beam,
                               warm_tokens=cap.kv_tokens, progress=progress)  # fmt: skip
    except EngineError as e:
        print(f"p2pinfer: {e}", file=sys.stderr)
        return 1
    print(f"warmed {entry.name} in {time.monotonic() - t0:.1f} s (load {shard.load_seconds:.1f} s); "
          f"kernels cached in {cache}")  # fmt: skip
    return 0


def _data_dir(args) -> Path:
    return load_settings({"data_dir": args.data_dir} if args.data_dir else {}).data_dir


def _cmd_id(args: argparse.Namespace) -> int:
    from p2pinfer.identity import load_or_create_identity

    print(load_or_create_identity(_data_dir(args)).peer_id)
    return 0


def _cmd_invite(args: argparse.Namespace) -> int:
    from p2pinfer.agent import STATE_FILE
    from p2pinfer.identity import JoinToken, load_or_create_secret

    data_dir = _data_dir(args)
    secret = load_or_create_secret(data_dir, args.cluster_secret_file)
    try:
        addrs = json.loads((data_dir / STATE_FILE).read_text())["addrs"]
    except (OSError, ValueError, KeyError):
        addrs = []
    if not addrs:
        print(
            "note: no running agent has recorded its addresses in this data dir yet; "
            "start `p2pinfer run` first for a token that also finds this peer",
            file=sys.stderr,
        )
    print(JoinToken(secret, tuple(addrs)).encode())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from p2pinfer.identity import IdentityError

    try:
        return {"run": _cmd_run, "id": _cmd_id, "invite": _cmd_invite, "chat": _cmd_client,
                "status": _cmd_client, "warm": _cmd_warm}[args.command](args)  # fmt: skip
    except (ConfigError, IdentityError) as e:
        print(f"p2pinfer: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
