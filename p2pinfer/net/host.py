"""The libp2p host: TCP, Noise with cluster admission, yamux, one connection per peer. Nothing else
(net/keeper.py keeps its connections, net/streams.py opens and serves its streams).

py-libp2p 0.8.1's defaults also offer TLS, secio and plaintext, and mplex; we set every option
explicitly so that no weaker or slower choice can be negotiated.
"""

from __future__ import annotations

import logging

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from p2pinfer.net import tuning
from p2pinfer.net.admission import AdmittingNoiseTransport

log = logging.getLogger("p2pinfer.net")


def connection_config() -> ConnectionConfig:
    # min_connections/low_watermark 0: the auto-connector would otherwise redial departed peers forever
    # (logging each failure at ERROR); discovery does our dialling, with backoff.
    return ConnectionConfig(
        min_connections=0,
        low_watermark=0,
        max_connections_per_peer=1,
        dial_timeout=5.0,
        inbound_upgrade_timeout=5.0,
        outbound_upgrade_timeout=5.0,
    )


class _StoppedSwarmNoise(logging.Filter):
    """py-libp2p logs a connection that could not be added at WARNING with a traceback ("[ADDCONN_FAIL]"):
    for a peer that redials us while we stop ("Cannot schedule task after service has stopped") or
    one that goes away while its connection starts ("Connection closed while starting"), that is
    expected churn, so DEBUG. (Redials reach a leaving peer more often now that the negative cache
    no longer blocks them; see build_host.) Anything else stays a warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "[ADDCONN_FAIL]" in str(record.msg):
            msg = record.getMessage()
            if "service has stopped" in msg or "Connection closed while starting" in msg:
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def build_host(key_pair: KeyPair, cluster_secret: bytes, listen: list[multiaddr.Multiaddr]) -> IHost:
    tuning.apply()  # py-libp2p performance adjustments (net/tuning.py), wire-compatible
    swarm_log = logging.getLogger("libp2p.network.swarm")
    if not any(isinstance(f, _StoppedSwarmNoise) for f in swarm_log.filters):
        swarm_log.addFilter(_StoppedSwarmNoise())
    noise = AdmittingNoiseTransport(
        key_pair,
        noise_privkey=create_x25519_key_pair().private_key,
        cluster_secret=cluster_secret,
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=listen,
        connection_config=connection_config(),
        enable_mDNS=False,  # ours runs on zeroconf, handed to trio properly
        enable_tcp=True,
    )
    # One attempt per dial: our dialler owns retries and backoff (new_host does not forward this).
    swarm = host.get_network()
    swarm.retry_config = RetryConfig(max_retries=0)
    # The auto-connector redials every known peer forever (ERROR per failure); our Dialer does
    # that job with backoff and forgets peers that left, so switch it off entirely.
    swarm.auto_connector.maybe_connect = _nothing
    swarm.auto_connector.run_background_task = _nothing
    # 0.8.1 refuses every dial to a peer for 60 s after one dial to it failed ("recently failed all
    # addresses (negative cache)"): a peer that restarted in 2 s stayed unreachable for a minute,
    # its ring streams failing to open although it was up and gossiping. Our Dialer backs off per
    # peer already and is told when a peer is heard again, so the cache lets everything through.
    swarm._negative_peer_cache._ttl = 0.0
    return host


async def _nothing(*args, **kwargs) -> None:
    return None


async def end_stream(stream, reset: bool = False) -> None:
    """Close (or reset) a stream, giving up after 1 s and ignoring a stream already gone: the caller is
    done with it either way."""
    with trio.move_on_after(1):
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:
            pass
