"""Prometheus metrics of one peer's request path (prometheus-client, own registry); api/ serves them."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http = Counter("p2pinfer_http_requests", "HTTP requests answered, by route and status",
                            ["route", "code"], registry=r)  # fmt: skip
        self.completions = Counter("p2pinfer_completions", "completion requests entered here, by how they ended",
                                   ["model", "finish"], registry=r)  # fmt: skip
        self.tokens = Counter("p2pinfer_tokens", "tokens of requests entered here (prompt, completion)",
                              ["model", "kind"], registry=r)  # fmt: skip
        self.ttft = Histogram("p2pinfer_time_to_first_token_seconds", "time from request to first token",
                              ["model"], registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))  # fmt: skip
        self.tps = Histogram("p2pinfer_decode_tokens_per_second", "tokens per second after the first, per request",
                             ["model"], registry=r, buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500))  # fmt: skip
        self.ring_size = Histogram("p2pinfer_ring_size", "members of each ring elected here", registry=r,
                                   buckets=(1, 2, 3, 4, 6, 8, 12, 16))  # fmt: skip
        self.replays = Counter("p2pinfer_ring_replays", "requests replayed on a new ring after a member was lost",
                               registry=r)  # fmt: skip
        self.peers = Gauge("p2pinfer_peers_in_view", "peers in this peer's view (itself included)", registry=r)
        self.active = Gauge("p2pinfer_active_requests", "requests entered here and not finished", registry=r)

    def watch(self, peers: Callable[[], int], link_bytes: Callable[[], dict[str, int]] | None = None,
              ring_streams: Callable[[], dict[str, int]] | None = None,
              step_rows: Callable[[], dict[str, int]] | None = None) -> None:  # fmt: skip
        """Read at scrape time: peers in view, bytes moved on ring links by direction, ring streams this
        peer opened or took again from its pool (serve/links.py), and decode steps by how many sessions
        each carried (serve/shards.py)."""
        self.peers.set_function(peers)
        if link_bytes is not None:
            self.registry.register(_ReadCounter("p2pinfer_link_bytes", "bytes moved on ring links (framed streams), "
                                                "by direction", "direction", link_bytes))  # fmt: skip
        if ring_streams is not None:
            self.registry.register(_ReadCounter("p2pinfer_ring_streams", "ring streams this peer opened, or reused "
                                                "from its pool", "how", ring_streams))  # fmt: skip
        if step_rows is not None:
            self.registry.register(_ReadCounter("p2pinfer_decode_steps", "decode steps this peer ran, by how "
                                                "many sessions each carried", "sessions", step_rows))  # fmt: skip


class _ReadCounter:
    """A counter family whose labelled values are read from the code that keeps them, at scrape time."""

    def __init__(self, name: str, help: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        self.name, self.help, self.label, self.read = name, help, label, read

    def collect(self):
        family = CounterMetricFamily(self.name, self.help, labels=[self.label])
        for value, n in sorted(self.read().items()):
            family.add_metric([value], n)
        yield family
