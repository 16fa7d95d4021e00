"""Multiaddr helpers: parse user input with a clear error, expand wildcard listen addresses."""

from __future__ import annotations

import ifaddr
import multiaddr
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo


class AddressError(ValueError):
    pass


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as e:
        raise AddressError(f"not a multiaddr: {text!r} ({e})") from e


def parse_peer_addr(text: str) -> PeerInfo:
    """A dialable peer address: /ip4/HOST/tcp/PORT/p2p/PEER_ID (the peer id is what Noise checks)."""
    ma = parse_multiaddr(text)
    try:
        peer = ma.value_for_protocol("p2p")
    except Exception:
        peer = None
    if not peer:
        raise AddressError(
            f"address {text!r} lacks /p2p/<peer id>; copy it from `p2pinfer invite` or /health"
        )
    try:
        pid = ID.from_base58(peer)
        transport = ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer}"))
    except Exception as e:
        raise AddressError(f"address {text!r} has a bad peer id: {e}") from e
    return PeerInfo(pid, [transport])


def interface_ipv4s() -> list[str]:
    ips = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in ips:
                ips.append(ip.ip)
    return ips


def advertised_addrs(listen: list[multiaddr.Multiaddr], peer_id: ID) -> list[str]:
    """Addresses others can dial: wildcard listens expanded to this host's interface addresses."""
    out: list[str] = []
    for ma in listen:
        try:
            host, port = ma.value_for_protocol("ip4"), ma.value_for_protocol("tcp")
        except Exception:
            continue
        hosts = interface_ipv4s() if host == "0.0.0.0" else [host]
        for h in hosts:
            a = f"/ip4/{h}/tcp/{port}/p2p/{peer_id}"
            if a not in out:
                out.append(a)
    # loopback last: it reaches only this machine, but that is where tests and local tools are
    return sorted(out, key=lambda a: a.startswith("/ip4/127."))
