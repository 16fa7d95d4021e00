"""Cluster admission: right after the Noise handshake, both sides prove they hold the cluster secret.

Each side sends a fresh 32-byte nonce, then an HMAC-SHA256 keyed by the secret over a role tag, both
peer ids (initiator first) and both nonces. The role tag stops a peer from reflecting our own MAC back
at us; fresh nonces from both sides stop replays. A peer that answers wrong or stays silent for
ADMISSION_TIMEOUT is refused before any muxer, gossip or ring stream exists on the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

import trio
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.peer.id import ID
from libp2p.security.exceptions import HandshakeFailure
from libp2p.security.noise.transport import Transport as NoiseTransport

log = logging.getLogger("p2pinfer.admission")

ADMISSION_TIMEOUT = 2.0
NONCE_BYTES = 32
MAC_BYTES = 32
_TAG = b"p2pinfer/admission/v1"


def admission_mac(secret: bytes, role: bytes, initiator: ID, responder: ID, n_i: bytes, n_r: bytes) -> bytes:
    msg = b"|".join([_TAG, role, initiator.to_bytes(), responder.to_bytes(), n_i, n_r])
    return hmac.new(secret, msg, hashlib.sha256).digest()


async def _read_exact(conn: ISecureConn, n: int) -> bytes:
    data = await conn.read(n)
    if len(data) != n:
        raise HandshakeFailure("connection closed during admission")
    return data


async def prove_membership(conn: ISecureConn, secret: bytes) -> None:
    """Run the exchange on a fresh secure connection; raise HandshakeFailure if the peer is no member."""
    initiator = conn.is_initiator
    me, them = conn.get_local_peer(), conn.get_remote_peer()
    ids = (me, them) if initiator else (them, me)
    my_nonce = secrets.token_bytes(NONCE_BYTES)
    await conn.write(my_nonce)
    their_nonce = await _read_exact(conn, NONCE_BYTES)
    nonces = (my_nonce, their_nonce) if initiator else (their_nonce, my_nonce)
    my_role, their_role = (b"I", b"R") if initiator else (b"R", b"I")
    await conn.write(admission_mac(secret, my_role, *ids, *nonces))
    their_mac = await _read_exact(conn, MAC_BYTES)
    if not hmac.compare_digest(their_mac, admission_mac(secret, their_role, *ids, *nonces)):
        raise HandshakeFailure("wrong cluster secret")


class AdmittingNoiseTransport(NoiseTransport):
    """Noise, then the cluster-secret proof; a refused peer never gets a muxed connection."""

    def __init__(self, *args, cluster_secret: bytes, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._cluster_secret = cluster_secret

    async def _admit(self, conn: ISecureConn, where: str) -> ISecureConn:
        peer = conn.get_remote_peer()
        try:
            with trio.fail_after(ADMISSION_TIMEOUT):
                await prove_membership(conn, self._cluster_secret)
        except trio.TooSlowError:
            reason = f"no admission proof within {ADMISSION_TIMEOUT:g} s"
        except HandshakeFailure as e:
            reason = str(e)
        except Exception as e:  # a peer dropping mid-exchange must not escape as a crash
            reason = f"admission failed: {type(e).__name__}: {e}"
        else:
            log.debug("admitted %s (%s)", peer, where)
            return conn
        log.warning("refused peer %s (%s): %s", peer, where, reason)
        with trio.move_on_after(1):
            await conn.close()
        raise HandshakeFailure(f"peer {peer} refused: {reason}")

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return await self._admit(await super().secure_inbound(conn), "inbound")

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return await self._admit(await super().secure_outbound(conn, peer_id), "outbound")
