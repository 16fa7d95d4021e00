"""Terminal clients of a peer's HTTP endpoint: `p2pinfer chat` (a streaming REPL) and `p2pinfer status`.

Both speak plain HTTP to one peer (the local one by default), with the API key when one is given, and
draw with rich. Ctrl-C during an answer closes that request's connection (the peer then cancels the
ring) and returns to the prompt; Ctrl-C at the prompt clears the line; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:52415"
HELP = """commands:
  /models         models the cluster serves (context length, sampling defaults)
  /peers          peers in this peer's view, their memory and layers
  /status         this session: peer, model, history, sampling
  /model NAME     switch model (history is kept)
  /reset          forget the conversation
  /help           this text
  /quit           leave (or Ctrl-D)
Ctrl-C stops an answer; the conversation goes on."""


class ClientError(Exception):
    """The peer could not be reached or answered with an error; the message is for the user."""


def default_url(data_dir: Path | None = None) -> str:
    """P2PINFER_URL, else the HTTP address a running agent recorded in its data dir, else the default port."""
    if os.environ.get("P2PINFER_URL"):
        return os.environ["P2PINFER_URL"]
    if data_dir is None:
        from p2pinfer.config import default_data_dir

        data_dir = default_data_dir()
    try:
        host_port = json.loads((data_dir / "state.json").read_text())["http"]
        host, _, port = host_port.rpartition(":")
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"http://{host}:{port}"
    except (OSError, ValueError, KeyError):
        return DEFAULT_URL


class Peer:
    """A tiny HTTP client (stdlib) for one peer."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 900.0) -> None:
        u = urllib.parse.urlsplit(url.rstrip("/"))
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ClientError(f"--url {url!r} must look like http://HOST:PORT")
        self.url, self.scheme, self.host = url.rstrip("/"), u.scheme, u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.api_key = api_key
        self.timeout = timeout

    def _conn(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _headers(self, body: bool = False) -> dict:
        h = {"Accept": "application/json"}
        if body:
            h["Content-Type"] = "application/json"
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def open(self, method: str, path: str, body: dict | None = None):
        conn = self._conn()
        try:
            conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                         headers=self._headers(body is not None))  # fmt: skip
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            raise ClientError(
                f"cannot reach {self.url}: {e.strerror or e} (is `p2pinfer run` running?)"
            ) from e
        if resp.status >= 400:
            data = resp.read()
            conn.close()
            try:
                msg = json.loads(data)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                msg = data.decode(errors="replace")[:200]
            hint = " (give --api-key-file or P2PINFER_API_KEY)" if resp.status == 401 else ""
            raise ClientError(f"{resp.status}: {msg}{hint}")
        return conn, resp

    def get(self, path: str) -> dict:
        conn, resp = self.open("GET", path)
        try:
            return json.loads(resp.read())
        finally:
            conn.close()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _percent(rest: list) -> str:
    """A loading entry's progress (weights read, then kernels warmed), as the record gossips it (0..1)."""
    return f"{100 * float(rest[0]):.0f}%" if rest else ""


def _fetched(progress: tuple[int, int] | None) -> str:
    """' fetched 12/65 MB' while a range's weights come from peers (serve/fetch.py)."""
    return f" fetched {progress[0] / 1e6:.0f}/{progress[1] / 1e6:.0f} MB" if progress else ""


def peers_table(cluster: dict) -> Table:
    t = Table(title=f"peers seen by {cluster['self'][-6:]}", title_justify="left", expand=False)
    for col in ("peer", "", "memory offered", "layers", "active", "compute", "seen"):
        t.add_column(col, justify="right" if col in ("active", "compute", "seen") else "left")
    peers = sorted(cluster["peers"], key=lambda p: (not p.get("self"), p["peer_id"]))
    for p in peers:
        flags = []
        if p.get("self"):
            flags.append("[blue]this peer[/]")
        if p.get("connected"):
            flags.append("[green]connected[/]")
        if not p.get("can_compute"):
            flags.append("[yellow]gateway[/]")
        layers = ", ".join(f"{m} [{s}, {e})" for m, s, e in p.get("layers", [])) or "-"
        fetching = {(m, s, e): (d, n) for m, s, e, d, n in p.get("fetching", [])}
        loading = [f"{m} [{s}, {e}) {_percent(rest)}" + _fetched(fetching.get((m, s, e)))
                   for m, s, e, *rest in p.get("loading", [])]  # fmt: skip
        if loading:
            layers = (
                ("" if layers == "-" else layers + "\n") + "[yellow]loading " + ", ".join(loading) + "[/]"
            )
        t.add_row(p["peer_id"][-6:], " ".join(flags), f"{_gib(p['memory_free'])} of {_gib(p['memory_total'])}",
                  layers, str(p.get("active_requests", 0)), f"{p.get('compute', 0)}", f"{p.get('age', 0):.1f}s")  # fmt: skip
    return t


def requests_table(reqs: list[dict]) -> Table:
    t = Table(title="requests entered here", title_justify="left")
    for col in ("request", "model", "state", "ring", "tokens", "TTFT", "tok/s"):
        t.add_column(col, justify="right" if col in ("tokens", "TTFT", "tok/s") else "left")
    for r in reqs[:10]:
        ring = " → ".join(f"{p[-6:]}[{s},{e})" for p, s, e in r.get("ring", [])) or "electing…"
        ttft = f"{r['ttft']:.2f}s" if r.get("ttft") is not None else "-"
        tps = f"{r['tokens_per_second']:.1f}" if r.get("tokens_per_second") is not None else "-"
        t.add_row(r["id"][-8:], r["model"], r["state"], ring, str(r["completion_tokens"]), ttft, tps)
    return t


def models_table(models: list[dict]) -> Table:
    t = Table(title="models", title_justify="left")
    for col in ("model", "context", "layers", "sampling defaults"):
        t.add_column(col)
    for m in models:
        d = m.get("sampling_defaults") or {}
        shown = ", ".join(f"{k}={v}" for k, v in d.items() if k in ("temperature", "top_k", "top_p", "min_p"))
        t.add_row(m["id"], str(m.get("context_length", "?")), str(m.get("n_layers", "?")), shown)
    return t


def status_view(peer: Peer) -> Group:
    cluster = peer.get("/v1/cluster")
    reqs = peer.get("/v1/requests")["data"]
    return Group(peers_table(cluster), requests_table(reqs))


def run_status(peer: Peer, watch: float | None, console: Console | None = None) -> int:
    console = console or Console()
    if watch is None:
        console.print(status_view(peer))
        return 0
    from rich.live import Live

    try:
        with Live(status_view(peer), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(watch)
                try:
                    live.update(status_view(peer))
                except ClientError as e:
                    live.update(Text(f"{e}", style="red"))
    except KeyboardInterrupt:
        return 0


@dataclass
class ChatSession:
    peer: Peer
    model: str | None
    sampling: dict = field(default_factory=dict)
    system: str | None = None
    history: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history


class Chat:
    def __init__(
        self, session: ChatSession, console: Console | None = None, history_file: Path | None = None
    ):
        self.s = session
        self.console = console or Console(highlight=False)
        self.history_file = history_file

    # --- input with line editing and a history kept across runs --------------------------------
    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:
            return
        if self.history_file is not None:
            try:
                readline.read_history_file(self.history_file)
            except OSError:
                pass
            readline.set_history_length(1000)

    def _save_readline(self) -> None:
        if self.history_file is None:
            return
        try:
            import readline

            self.history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(self.history_file)
        except (ImportError, OSError):
            pass

    def run(self) -> int:
        self._setup_readline()
        c = self.console
        try:
            models = [m["id"] for m in self.s.peer.get("/v1/models")["data"]]
        except ClientError as e:
            c.print(f"[red]{e}[/]")
            return 1
        if self.s.model is None:
            self.s.model = models[0] if models else None
        c.print(
            f"[bold]p2pinfer chat[/] · {self.s.peer.url} · model [cyan]{self.s.model}[/] · /help for commands"
        )
        try:
            while True:
                try:
                    line = input("you> ")
                except KeyboardInterrupt:
                    c.print()
                    continue
                except EOFError:
                    c.print()
                    return 0
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/"):
                    if self.command(line) == "quit":
                        return 0
                    continue
                self.ask(line)
        finally:
            self._save_readline()

    def command(self, line: str) -> str | None:
        c = self.console
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if cmd in ("/quit", "/exit"):
                return "quit"
            if cmd == "/help":
                c.print(HELP, markup=False)
            elif cmd == "/models":
                c.print(models_table(self.s.peer.get("/v1/models")["data"]))
            elif cmd == "/peers":
                c.print(peers_table(self.s.peer.get("/v1/cluster")))
            elif cmd == "/status":
                health = self.s.peer.get("/health")
                c.print(
                    f"peer {health['peer_id']} ({health['status']}, up {health['uptime']} s) at {self.s.peer.url}"
                )
                c.print(f"model {self.s.model} · history: {len(self.s.history)} messages · sampling: "
                        f"{self.s.sampling or 'model defaults'}", markup=False)  # fmt: skip
                c.print(requests_table(self.s.peer.get("/v1/requests")["data"]))
            elif cmd == "/model":
                models = [m["id"] for m in self.s.peer.get("/v1/models")["data"]]
                if not arg:
                    c.print(f"model {self.s.model}; available: {', '.join(models)}", markup=False)
                elif arg not in models:
                    c.print(f"[red]no model {arg!r} in the cluster; available: {', '.join(models)}[/]")
                else:
                    self.s.model = arg
                    c.print(f"model [cyan]{arg}[/]")
            elif cmd == "/reset":
                self.s.history.clear()
                c.print("conversation reset")
            else:
                c.print(f"[red]unknown command {cmd}[/] (/help lists them)")
        except ClientError as e:
            c.print(f"[red]{e}[/]")
        return None

    def ask(self, text: str) -> None:
        c = self.console
        self.s.history.append({"role": "user", "content": text})
        body = {"model": self.s.model, "messages": self.s.messages(), "stream": True,
                "stream_options": {"include_usage": True}, **self.s.sampling}  # fmt: skip
        answer: list[str] = []
        t0 = time.monotonic()
        t_first, n = None, 0
        conn = None
        try:
            conn, resp = self.s.peer.open("POST", "/v1/chat/completions", body)
            with c.status("waiting for the ring…", spinner="dots") as spin:
                first = self._next_event(resp)
                spin.stop()
            event = first
            while event is not None:
                if event.get("error"):
                    raise ClientError(event["error"].get("message", "error"))
                if event.get("usage"):
                    n = event["usage"]["completion_tokens"]
                for ch in event.get("choices", []):
                    piece = (ch.get("delta") or {}).get("content") or ""
                    if piece:
                        if t_first is None:
                            t_first = time.monotonic()
                            c.print("[bold green]ai>[/] ", end="")
                        answer.append(piece)
                        n += 1
                        c.out(piece, end="", highlight=False)
                event = self._next_event(resp)
            c.print()
            self.s.history.append({"role": "assistant", "content": "".join(answer)})
            if t_first is not None:
                dt = time.monotonic() - t_first
                rate = f" · {(n - 1) / dt:.1f} tok/s" if n > 1 and dt > 0 else ""
                c.print(f"[dim]{n} tokens · TTFT {t_first - t0:.2f} s{rate}[/]")
        except KeyboardInterrupt:
            c.print("\n[yellow]\\[stopped][/]")
            if answer:
                self.s.history.append({"role": "assistant", "content": "".join(answer)})
            else:
                self.s.history.pop()
        except ClientError as e:
            c.print(f"\n[red]{e}[/]")
            self.s.history.pop()
        finally:
            if conn is not None:
                conn.close()  # the peer sees the client gone and cancels the ring

    @staticmethod
    def _next_event(resp) -> dict | None:
        """The next SSE data object, or None at [DONE] / end of stream."""
        while True:
            line = resp.readline()
            if not line:
                return None
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return None
            return json.loads(data)


def read_key(api_key_file: Path | None) -> str | None:
    if api_key_file is not None:
        try:
            return api_key_file.read_text().strip() or None
        except OSError as e:
            raise ClientError(f"cannot read --api-key-file {api_key_file}: {e.strerror}") from e
    return os.environ.get("P2PINFER_API_KEY") or None
