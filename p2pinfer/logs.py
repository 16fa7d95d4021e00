"""Logging for the agent: one format, one stream, libp2p's logger routed in."""

from __future__ import annotations

import logging
import sys


class _Libp2pNoise(logging.Filter):
    """py-libp2p logs expected churn (a refused or departed peer) at ERROR; our own lines say it once."""

    QUIET = (
        "failed to upgrade security",
        "fail to upgrade mux",
        "Failed to connect",
        "unable to connect",
        "Failed to open TCP stream",
    )

    # gossipsub mesh upkeep py-libp2p logs at WARNING: routine while peers join and leave
    MESH = ("GRAFT: ignoring request from", "GRAFT flood detected from peer")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("libp2p.pubsub") and record.levelno == logging.WARNING:
            if any(q in record.getMessage() for q in self.MESH):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        if record.name.startswith("libp2p") and record.levelno >= logging.ERROR:
            msg = record.getMessage()
            if any(q in msg for q in self.QUIET):
                record.levelno, record.levelname = logging.DEBUG, "DEBUG"
                return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_Libp2pNoise())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # py-libp2p's logger does not propagate and has no handler of its own: give it ours.
    lib = logging.getLogger("libp2p")
    lib.handlers[:] = [handler]
    lib.setLevel(max(logging.WARNING, root.level))
    lib.propagate = False
    for noisy in ("hypercorn.access", "zeroconf", "multiaddr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
