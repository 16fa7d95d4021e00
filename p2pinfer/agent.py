"""The agent: wires identity, the libp2p host, discovery, membership and HTTP into one trio nursery."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import multiaddr
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from p2pinfer import __version__, progress
from p2pinfer.api.app import build_app
from p2pinfer.api.openai import OpenAIRoutes
from p2pinfer.config import ConfigError, Settings, is_loopback_host
from p2pinfer.device import measure_compute, memory_info
from p2pinfer.identity import (
    IdentityError,
    JoinToken,
    load_or_create_identity,
    load_or_create_secret,
    store_secret,
)
from p2pinfer.membership import TOPIC, Membership
from p2pinfer.net.addrs import (
    AddressError,
    advertised_addrs,
    interface_ipv4s,
    parse_multiaddr,
    parse_peer_addr,
)
from p2pinfer.net.blobs import Blobs
from p2pinfer.net.gossip import Gossip
from p2pinfer.net.host import build_host
from p2pinfer.net.keeper import Keeper
from p2pinfer.net.mdns import MdnsDiscovery
from p2pinfer.net.streams import TRAFFIC, Streams
from p2pinfer.serve.entry import EntryService
from p2pinfer.serve.fetch import WeightService
from p2pinfer.serve.generate import Generator
from p2pinfer.serve.links import Linker
from p2pinfer.serve.member import Member
from p2pinfer.serve.metrics import Metrics
from p2pinfer.serve.shards import ShardHost
from p2pinfer.serve.spares import SparePreloader
from p2pinfer.weights.store import WeightStore

log = logging.getLogger("p2pinfer.agent")

STATE_FILE = "state.json"


def _read_state(data_dir: Path) -> dict:
    try:
        return json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _bind_http(host: str, port: int) -> int:
    """Check the HTTP port now, so a busy port is one clear sentence at start-up; 0 picks a free one."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            return s.getsockname()[1]
    except OSError as e:
        raise ConfigError(f"cannot serve HTTP on {host}:{port}: {e.strerror or e}") from e


def _listen_addrs(settings: Settings, state: dict) -> list[multiaddr.Multiaddr]:
    """Parse --listen; a wildcard port reuses last run's port when it is still free."""
    out = []
    for text in settings.listen:
        try:
            ma = parse_multiaddr(text)
            host, port = ma.value_for_protocol("ip4"), int(ma.value_for_protocol("tcp"))
        except AddressError as e:
            raise ConfigError(f"--listen: {e}") from e
        except Exception as e:
            raise ConfigError(f"--listen {text!r} must be /ip4/HOST/tcp/PORT") from e
        if port == 0 and (old := state.get("p2p_port")) and _port_free(host, int(old)):
            port = int(old)
        elif port and not _port_free(host, port):
            raise ConfigError(f"cannot listen on {host}:{port}: the port is in use")
        out.append(multiaddr.Multiaddr(f"/ip4/{host}/tcp/{port}"))
    return out


def run_agent(settings: Settings) -> None:
    """Build an agent (a ConfigError is one sentence for the user) and run it until it is stopped."""
    agent = Agent(settings)
    trio.run(agent.run)
    log.info("agent stopped")
    if agent.shards.engine_busy():
        # A shard load whose caller was cancelled by the shutdown still runs in its worker thread; nothing
        # of it is needed, and interpreter exit would run tinygrad's atexit hooks under that thread's feet.
        # Its compile workers (tinygrad's process pool) are ended first: left to find their parent gone,
        # each printed a BrokenPipeError traceback.
        _end_compile_workers()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _end_compile_workers() -> None:
    try:
        from tinygrad.engine import worker

        worker.terminate_worker_pool()
    except Exception as e:  # tinygrad's internals move between versions; exiting matters more
        log.debug("could not end tinygrad's compile workers: %s", e)


class Agent:
    """Every part of one peer, built in dependency order: who we are, then the network, then the
    request path on top of it. Nothing is assigned after construction; `run` starts it all."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started_at = time.monotonic()
        self._addrs: list[str] = []
        self._stopping = False
        self._who_we_are(settings)
        self._network(settings)
        self._request_path(settings)

    def _who_we_are(self, s: Settings) -> None:
        """Data dir, key, cluster secret (or a join token), API key, bootstrap addresses."""
        try:
            s.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create data dir {s.data_dir}: {e.strerror}") from e
        try:
            self.identity = load_or_create_identity(s.data_dir)
            self.bootstrap = list(s.bootstrap)
            if s.join:
                token = JoinToken.decode(s.join)
                self.secret = token.secret
                store_secret(s.data_dir, token.secret)
                self.bootstrap += list(token.addrs)
            else:
                self.secret = load_or_create_secret(s.data_dir, s.cluster_secret_file)
        except IdentityError as e:
            raise ConfigError(str(e)) from e
        self.api_key = None
        if s.api_key_file is not None:
            try:
                self.api_key = s.api_key_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"cannot read --api-key-file {s.api_key_file}: {e.strerror}") from e
            if not self.api_key:
                raise ConfigError(f"--api-key-file {s.api_key_file} is empty")
        self.bootstrap_infos = []
        for text in self.bootstrap:
            try:
                self.bootstrap_infos.append(parse_peer_addr(text))
            except AddressError as e:
                log.warning("ignoring bootstrap address: %s", e)
        self.peer_id = self.identity.peer_id.to_base58()

    def _network(self, s: Settings) -> None:
        """Ports (checked now, so a busy one is a start-up sentence), the libp2p host and its keeper,
        gossip and membership."""
        self.state = _read_state(s.data_dir)
        self.listen = _listen_addrs(s, self.state)
        self.http_port = _bind_http(s.http_host, s.http_port)
        self.memory_total, _ = memory_info()
        self.compute = measure_compute() if s.compute else 0.0
        self.host = build_host(self.identity.key_pair, self.secret, self.listen)
        self.keeper = Keeper(self.host)  # dials, pings, closes and forgets connections
        self.streams = Streams(self.keeper)
        self.blobs = Blobs(self.host)  # bulk bytes on request (the weights protocol, serve/fetch.py)
        self.membership = Membership(self.identity, self.secret, Gossip(self.host, TOPIC), self.keeper,
                                     self.describe, s.peer_ttl)  # fmt: skip

    def _request_path(self, s: Settings) -> None:
        """Shards and the member side, the entry side and its Generator, the OpenAI routes."""
        from p2pinfer.engine import ModelCatalog, configure

        configure(kernel_cache_dir=s.data_dir)  # compiled kernels persist across restarts (see `p2pinfer warm`)
        self.catalog = ModelCatalog(s.models_dirs) if s.local_models else ModelCatalog((), include_embedded=False)
        if s.model not in {e.name for e in self.catalog.list()}:
            log.warning("default model %s is not available here; known: %s", s.model,
                        ", ".join(e.name for e in self.catalog.list()) or "none")  # fmt: skip
        # weights travel peer to peer: we upload the chunks of the models we hold, and fetch those of a
        # range we are given without the file, before the shard loads (serve/fetch.py)
        self.weights = WeightService(self.blobs, self.peer_id, self.catalog, WeightStore(s.data_dir, s.cache_limit),
                                     self.membership.view.records, s.upload_limit, self.membership.poke,
                                     can_fetch=s.compute, busy=lambda: self.shards.in_use())  # fmt: skip
        self.shards = ShardHost(s.memory_limit, self.membership.poke, s.capacity, prepare=self.weights.prepare)
        self.linker = Linker(self.streams, self.peer_id, quiet_for=self.membership.quiet_for)
        self.member = Member(self.catalog, self.shards, self.linker, self.membership.poke, can_compute=s.compute,
                             resolve_model=self.weights.ensure_entry)  # fmt: skip
        self.linker.serve(self.member.handle)
        self.entry = EntryService(self.peer_id, self.linker, self.membership.view.records, s.max_requests,
                                  s.capacity)  # fmt: skip
        self.metrics = Metrics()
        self.metrics.watch(lambda: len(self.membership.view.records()), lambda: dict(TRAFFIC),
                           lambda: {"opened": self.linker.opened, "reused": self.linker.reused},
                           lambda: {str(n): c for n, c in sorted(self.shards.step_rows.items())})
        self.generator = Generator(self.catalog, self.entry, self.metrics, s.model, s.routing,
                                   resolve_model=self.weights.ensure_entry)  # fmt: skip
        self.openai = OpenAIRoutes(self.generator, self.served_models)

    async def _warm_default_model(self) -> None:
        """Load the default model whole in the background when this peer could serve it alone (a lone agent,
        `make run`), so the first request finds its kernels captured instead of waiting for them."""
        from p2pinfer.engine import EngineError

        s = self.settings
        if not (s.compute and s.warm):
            return
        try:
            entry = self.catalog.get(s.model)
        except EngineError:
            return
        need, offer = self.entry.needs(entry).total_bytes, self.memory_offer()
        if need > offer:
            log.info("not warming %s at start: it needs %.0f MB with KV headroom, this peer offers %.0f MB",
                     entry.name, need / 1e6, offer / 1e6)  # fmt: skip
            return
        try:
            shard = await self.shards.acquire(entry, 0, entry.n_layers)
        except EngineError as e:
            log.warning("warming %s at start failed: %s", entry.name, e)
            return
        self.shards.release(shard)

    # --- what we tell the cluster ------------------------------------------
    def memory_offer(self) -> int:
        if not self.settings.compute:
            return 0
        return self.shards.offer(memory_info()[1])

    def served_models(self) -> list[str]:
        """Every model some computing peer in the view has, or could fetch from a peer that offers it."""
        records = self.membership.view.records()
        models = {m for r in records if r.can_compute for m in r.models}
        if any(r.can_compute and r.fetches for r in records):
            models |= {w[0] for r in records for w in r.weights}
        return sorted(models)

    def describe(self) -> dict:
        return {
            "addrs": tuple(self._addrs),
            "http_port": self.http_port,
            "version": __version__,
            "memory_total": self.memory_total,
            "memory_free": self.memory_offer(),
            "compute": self.compute,
            "backend": "tinygrad",
            "can_compute": self.settings.compute,
            "models": tuple(e.name for e in self.catalog.list()),
            "layers": self.shards.layers(),
            "loading": self.shards.loading(),
            "fetching": self.shards.fetching(),
            **self.weights.record_fields(),
            "active_requests": self.member.active_requests,
            "draining": self._stopping,
        }

    # --- what the HTTP app asks --------------------------------------------
    def listen_addrs(self) -> list[str]:
        return list(self._addrs)

    def own_hosts(self) -> set[str]:
        """Names this peer answers to in a Host header, besides loopback (the DNS rebinding guard)."""
        hosts = {a.split("/")[2] for a in self._addrs}
        http_host = self.settings.http_host
        if http_host in ("0.0.0.0", "::", ""):
            hosts.update(interface_ipv4s())
        else:
            hosts.add(http_host)
        name = socket.gethostname()
        hosts.update({name, f"{name}.local"})
        return hosts

    def status(self) -> str:
        return "draining" if self._stopping else "ok"

    def cluster_snapshot(self) -> dict:
        rings = {rid: [[m.peer_id, m.start, m.end] for m in ring] for rid, ring in self.entry.rings.items()}
        return {"self": self.peer_id, "peers": self.membership.snapshot(), "rings": rings}

    # --- lifecycle ---------------------------------------------------------
    def _save_state(self) -> None:
        ports = [a.value_for_protocol("tcp") for a in self.host.get_transport_addrs()]
        state = {
            "peer_id": self.peer_id,
            "addrs": self._addrs,
            "p2p_port": int(ports[0]) if ports else 0,
            "http": f"{self.settings.http_host}:{self.http_port}",
        }
        try:
            (self.settings.data_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
        except OSError as e:
            log.warning("cannot write %s: %s", STATE_FILE, e)

    def http_routes(self) -> list:
        return self.openai.routes()

    async def _serve_http(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = HypercornConfig()
        config.bind = [f"{self.settings.http_host}:{self.http_port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("hypercorn.error")
        config.graceful_timeout = 1.0
        s = self.settings
        app = build_app(self, self.api_key, self.http_routes(), metrics=self.metrics, own_hosts=self.own_hosts,
                        allowed_hosts=s.allowed_hosts, cors_origins=s.cors_origins)  # fmt: skip
        await hypercorn_serve(app, config, task_status=task_status)

    async def _on_mdns_peer(self, peer: str, addrs: list[str]) -> None:
        for a in addrs:
            try:
                info = parse_peer_addr(a)
            except AddressError:
                continue
            self.keeper.want(info, "mdns")

    async def _watch_signals(self, cancel: trio.CancelScope) -> None:
        """Three-phase shutdown: stop taking work (and say so in our record), let the requests in flight
        finish for up to --drain-timeout (a second signal cuts that short), then leave and exit."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            signum = await signals.__anext__()
            timeout = self.settings.drain_timeout
            log.info("received %s: draining (up to %.0f s; a second signal stops at once)",
                     signal.Signals(signum).name, timeout)  # fmt: skip
            self._stopping = self.entry.draining = self.member.draining = True
            self.membership.poke()
            t0 = time.monotonic()
            with trio.move_on_after(timeout) as drain:
                async with trio.open_nursery() as nursery:

                    async def second_signal() -> None:
                        async for again in signals:
                            log.info("received %s again: stopping now", signal.Signals(again).name)
                            drain.cancel()

                    nursery.start_soon(second_signal)
                    while self.entry.active or self.member.active_requests:
                        await trio.sleep(0.1)
                    nursery.cancel_scope.cancel()
            left = self.entry.active + self.member.active_requests
            log.info("drained in %.1f s%s: leaving the cluster", time.monotonic() - t0,
                     f" ({left} request(s) cut off)" if left else "")  # fmt: skip
            await self.membership.leave()
            cancel.cancel()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_signals, nursery.cancel_scope)
            async with self.host.run(self.listen):
                self._addrs = advertised_addrs(list(self.host.get_transport_addrs()), self.identity.peer_id)
                self._save_state()
                await nursery.start(self.membership.run)
                nursery.start_soon(self.keeper.run)
                await nursery.start(self.linker.run)  # ring streams kept open across requests
                for info in self.bootstrap_infos:
                    self.keeper.want(info, "bootstrap", persistent=True)
                if self.settings.mdns:
                    port = int(self.host.get_transport_addrs()[0].value_for_protocol("tcp"))
                    ips = sorted({a.split("/")[2] for a in self._addrs})
                    mdns = MdnsDiscovery(
                        self.peer_id,
                        port,
                        ips,
                        self.secret,
                        lambda p, a: nursery.start_soon(self._on_mdns_peer, p, a),
                    )
                    nursery.start_soon(mdns.run)
                nursery.start_soon(self.weights.run)
                nursery.start_soon(self.generator.warm, self.settings.model)
                nursery.start_soon(self._warm_default_model)
                nursery.start_soon(progress.watch, self.shards.progress)  # bars on a terminal only
                if self.settings.compute and self.settings.preload:
                    spares = SparePreloader(self.peer_id, self.catalog, self.shards, self.membership.view.records,
                                            self.memory_offer)  # fmt: skip
                    nursery.start_soon(spares.run)
                await nursery.start(self._serve_http)
                log.info(
                    "agent %s up: p2p %s, http http://%s:%d",
                    self.peer_id,
                    ", ".join(self._addrs),
                    self.settings.http_host,
                    self.http_port,
                )
                if not is_loopback_host(self.settings.http_host):
                    log.info("HTTP is bound beyond loopback: every request needs the API key")
                await trio.sleep_forever()
