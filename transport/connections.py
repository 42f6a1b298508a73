"""What the HTTP server allows a connection before any handler runs (``duplex serve``'s aiohttp server):

- headers within :data:`HEADER_TIMEOUT_S` of connecting or of the previous answer, or the connection
  is closed (aiohttp's keep-alive timer, an hour by default, is set to that; a handler reading a body
  has its own deadline, see :mod:`.server`);
- at most ``max_per_address`` open connections from one address (an IPv6 /64); more are answered 429
  and closed at once;
- what aiohttp answers itself (a malformed request line or header) is JSON ``{"error": ...}`` like every
  other refusal, logged as one line per :data:`LOG_EVERY_S` with a count, never a traceback;
- the soft ``RLIMIT_NOFILE`` raised to the hard limit (:func:`raise_file_limit`), so idle connections
  run out of deadline before the server runs out of files.

:meth:`duplex.transport.server.Site.runner` builds the runner that applies all of this.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_server import Server

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0  # a request's headers, from connecting or from the previous answer
LOG_EVERY_S = 10.0  # at most one line per this long for each thing a client can cause at will


class RateLimitedLog:
    """One log line per ``every_s`` for something a client can cause at will (a lost connection, a
    malformed message, a full file table), with the count of those not logged in between: never a
    flood, never silent."""

    def __init__(self, logger: logging.Logger, level: int, every_s: float = LOG_EVERY_S) -> None:
        self.logger, self.level, self.every_s = logger, level, every_s
        self._last = -float("inf")
        self._skipped = 0

    def log(self, message: str) -> bool:
        """Log ``message`` unless one was logged in the last ``every_s``; whether it was."""
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._skipped += 1
            return False
        more = f" (and {self._skipped} more like it in the last {now - self._last:.0f} s)" if self._skipped else ""
        self._last, self._skipped = now, 0
        self.logger.log(self.level, "%s%s", message, more)
        return True


def address_key(remote: str | None) -> str:
    """Whose connections and sessions count together: an IPv4 address, or an IPv6 address's /64."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "?"
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def within(remote: str | None, networks: tuple[str, ...]) -> bool:
    """Whether address ``remote`` is in one of ``networks`` (CIDR strings)."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(n, strict=False) for n in networks)


def raise_file_limit() -> tuple[int, int] | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (each connection, peer and socket is a file);
    (soft before, soft now), or None where there is no such limit."""
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft, soft
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target


@dataclass
class Limits:
    """What every connection of one server shares: the cap, the count, the headers of a refusal."""

    max_per_address: int
    exempt: tuple[str, ...]  # networks the cap does not apply to
    headers: dict[str, str]  # sent with every refusal made here (security headers)
    open: Counter[str] = field(default_factory=Counter)  # connections by address_key
    refused: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log, logging.WARNING))
    malformed: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log, logging.INFO))
    failed: RateLimitedLog = field(default_factory=lambda: RateLimitedLog(log, logging.WARNING))


class _Connection(RequestHandler):
    """aiohttp's handler of one connection, with the per-address cap and JSON refusals."""

    limits: Limits
    _key: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        remote = peer[0] if isinstance(peer, tuple) and peer else None
        key = address_key(remote)
        limits = self.limits
        if limits.open[key] >= limits.max_per_address and not within(remote, limits.exempt):
            limits.refused.log(f"refused a connection from {key}: it has {limits.open[key]} open (at most "
                               f"{limits.max_per_address})")
            body = json.dumps({"error": f"too many connections from your address (at most "
                                        f"{limits.max_per_address}); close some and try again"}).encode()
            head = ["HTTP/1.1 429 Too Many Requests", "Content-Type: application/json; charset=utf-8",
                    f"Content-Length: {len(body)}", "Connection: close", "Retry-After: 10",
                    *(f"{k}: {v}" for k, v in limits.headers.items())]
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            self.force_close()
            return
        self._key = key
        limits.open[key] += 1

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._key is not None:
            self.limits.open[self._key] -= 1
            if self.limits.open[self._key] <= 0:
                del self.limits.open[self._key]
            self._key = None
        super().connection_lost(exc)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own refusals (a request it could not parse) as JSON, logged as one line."""
        if request.writer.output_size > 0:  # an answer has begun: nothing more can be said on it
            raise ConnectionError("the answer was already under way")
        if status >= 500:
            self.limits.failed.log(f"a request from {request.remote} failed in the HTTP server: "
                                   f"{type(exc).__name__}: {exc}")
            text = "internal error; see the server log"
        else:
            why = (message or getattr(exc, "message", None) or str(exc or "")).strip().splitlines()
            text = f"malformed HTTP request: {why[0] if why else 'unreadable'}"
            self.limits.malformed.log(f"{text} (from {request.remote})")
        response = web.json_response({"error": text}, status=status, headers=self.limits.headers)
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other complaints about a connection: one line (rate-limited), no traceback."""
        exc = kw.get("exc_info")
        what = (args[0] % args[1:]) if args else "error"
        self.limits.failed.log(f"HTTP server: {what}" + (f": {type(exc).__name__}: {exc}"
                                                         if isinstance(exc, BaseException) else ""))


class _Server(Server):
    """aiohttp's connection factory, making :class:`_Connection` handlers."""

    limits: Limits

    def __call__(self) -> RequestHandler:
        handler = _Connection(self, loop=self._loop, **self._kwargs)
        handler.limits = self.limits
        return handler


class Runner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections are held to :class:`Limits`."""

    def __init__(self, app: web.Application, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server, making our handlers (it adds no state of its own)
        assert isinstance(server, _Server)
        server.limits = self.limits
        return server
