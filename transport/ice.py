"""ICE on one machine: let aiortc offer a loopback (127.0.0.1) host candidate.

aioice gathers host candidates from every interface except loopback, so a server bound to
127.0.0.1 on a machine whose only interface is ``lo`` (a CI container, a laptop offline) cannot be
reached over WebRTC even by a browser on the same machine. :func:`allow_loopback_candidates` makes
aioice add 127.0.0.1 to the addresses it gathers from; the server calls it when it binds a loopback
address (its clients are then on this machine). Browsers need their side too: Chromium uses
loopback candidates only with ``--allow-loopback-in-peer-connection``.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def allow_loopback_candidates() -> bool:
    """Make aioice gather a 127.0.0.1 host candidate too (idempotent). False if aioice changed shape."""
    from aioice import ice

    original = getattr(ice, "get_host_addresses", None)
    if original is None:
        log.warning("aioice has no get_host_addresses; loopback ICE candidates are not offered")
        return False
    if getattr(original, "_duplex_loopback", False):
        return True

    @functools.wraps(original)
    def with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        addresses = list(original(use_ipv4, use_ipv6))
        if use_ipv4 and LOOPBACK not in addresses:
            addresses.append(LOOPBACK)
        return addresses

    with_loopback._duplex_loopback = True  # type: ignore[attr-defined]
    ice.get_host_addresses = with_loopback
    return True


def is_loopback_host(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
