"""mDNS discovery on the LAN via zeroconf.

Zeroconf runs its own threads and calls back on them; we hand each sighting to trio through the
run's token and dial from trio. The advertisement carries a cluster tag (a hash of the secret, not
the secret) so agents skip other clusters' peers instead of dialling them to be refused.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Callable

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger("p2pinfer.mdns")

SERVICE_TYPE = "_p2pinfer._tcp.local."


def cluster_tag(secret: bytes) -> str:
    return hashlib.sha256(b"p2pinfer/mdns-tag/v1\x00" + secret).hexdigest()[:16]


Sighting = Callable[[str, list[str]], None]  # (peer id, ["/ip4/.../tcp/.../p2p/..."])


class MdnsDiscovery:
    def __init__(self, peer_id: str, port: int, ips: list[str], secret: bytes, on_peer: Sighting) -> None:
        self.peer_id = peer_id
        self.port = port
        self.ips = [ip for ip in ips if not ip.startswith("127.")]
        self.tag = cluster_tag(secret)
        self.on_peer = on_peer
        self._zc: Zeroconf | None = None
        self._token: trio.lowlevel.TrioToken | None = None

    def _service_info(self) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            f"{self.peer_id}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(ip) for ip in self.ips],
            port=self.port,
            properties={"id": self.peer_id, "c": self.tag},
        )

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange):
        # zeroconf's browser thread; blocking lookups are allowed here, trio calls are not
        if state_change not in (ServiceStateChange.Added, ServiceStateChange.Updated):
            return
        try:
            info = zeroconf.get_service_info(service_type, name, timeout=2000)
            if info is None:
                return
            props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
            peer, tag = props.get("id", ""), props.get("c", "")
            if tag != self.tag or not peer or peer == self.peer_id:
                return
            addrs = [
                f"/ip4/{ip}/tcp/{info.port}/p2p/{peer}" for ip in info.parsed_addresses(IPVersion.V4Only)
            ]
        except Exception as e:  # a malformed announcement from anyone on the LAN must not matter
            log.debug("ignored mDNS announcement %s: %s", name, e)
            return
        if addrs and self._token is not None:
            try:
                self._token.run_sync_soon(self.on_peer, peer, addrs)
            except trio.RunFinishedError:
                pass

    async def run(self) -> None:
        if not self.ips:
            log.warning("mDNS: no non-loopback IPv4 address to announce; discovery is off")
            return
        self._token = trio.lowlevel.current_trio_token()
        zc = await trio.to_thread.run_sync(lambda: Zeroconf(ip_version=IPVersion.V4Only))
        self._zc = zc
        browser = None
        try:
            await trio.to_thread.run_sync(zc.register_service, self._service_info())
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
            log.info("mDNS: announcing %s on %s", SERVICE_TYPE, ", ".join(self.ips))
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                self._token = None
                if browser is not None:
                    browser.cancel()
                await trio.to_thread.run_sync(zc.close)
