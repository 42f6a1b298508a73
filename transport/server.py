"""The ``duplex serve`` web app: the browser client, WebRTC signalling, one Session per peer.

Routes:

- ``GET /``, ``GET /app.js`` ...: the page (files of web/);
- ``POST /api/offer``: an SDP offer in, the answer out (:mod:`.signalling` has the shapes);
- ``PATCH /api/offer``: trickle ICE candidates for a connection;
- ``GET /api/status``: session counts, states, each session's latest latency figures and the limits
  (connection ids only with the operator token).

Ownership: each connection's answer carries a ``secret`` (random, 192 bits) given to that peer only;
renegotiating, restarting or trickling candidates for a ``pc_id`` needs it, so knowing an id is not
enough to act on someone else's session. Without it a connection answers as one that is not open (an
offer naming it starts a new session, candidates for it are a 404), so nobody learns which ids are live.
``token`` (``--token``) makes every offer, candidate and status request present ``Authorization: Bearer
<token>`` (401 otherwise); ``admin_token`` (``--admin-token``) is needed for the connection ids in the
status (and opens the status too). Every answer carries :data:`SECURITY_HEADERS`.

Hygiene: request bodies are capped (``max_body`` bytes, 413 beyond), at most ``max_sessions`` peers
at once (503 beyond, with ``Retry-After``), every refused request gets a JSON ``{"error": ...}`` with a
4xx status and a message saying what was wrong, and nothing a client sends can raise out of a
handler (an unexpected failure is a logged 500 for that request only). Headers must be in within
``HEADER_TIMEOUT_S`` and a body within :data:`BODY_TIMEOUT_S` (408); connections per address are capped
and aiohttp's own refusals are JSON too when served through :meth:`Site.runner` (:mod:`.connections`). Peers that vanish are closed
with their session (see :mod:`.peer`); :meth:`Server.close` closes them all on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duplex.agent import Agent
from duplex.transport.connections import (HEADER_TIMEOUT_S, Limits, RateLimitedLog, Runner, address_key,
                                          raise_file_limit, within)
from duplex.transport.peer import Peer, PeerOptions, add_candidates, open_peer, renegotiate
from duplex.transport.realtime_socket import MAX_MESSAGE, RealtimeSocket, new_socket_id
from duplex.transport.resume import ResumableConversations, new_token
from duplex.transport.signalling import BadRequest, Offer, parse_json, parse_offer, parse_patch

log = logging.getLogger(__name__)

WEB_ROOT = Path(__file__).resolve().parents[1] / "web"
NOT_CONNECTED = "no WebRTC connection in time (ICE did not complete)"  # a close reason
BODY_TIMEOUT_S = 10.0  # a request's body, once its headers are in
LINGER_S = 2.0  # the rest of a body refused unread, dropped before the connection closes (aiohttp's default: 10)
OFFER_TIMEOUT_S = 20.0  # answering an offer (ICE gathering included) takes well under a second
CANDIDATES_TIMEOUT_S = 5.0  # adding trickled candidates (mDNS names are resolved, 1 s each at most)


@dataclass
class ServerOptions:
    max_sessions: int = 4
    max_body: int = 64 * 1024  # bytes of a signalling request
    web_root: Path = WEB_ROOT
    peer: PeerOptions = field(default_factory=PeerOptions)
    token: str | None = None  # offers and candidates must present it (Authorization: Bearer ...)
    admin_token: str | None = None  # the status shows connection ids only to requests presenting it
    loopback_bind: bool = True  # bound to loopback only: a request's Host must name this machine (DNS rebinding)
    allowed_hosts: tuple[str, ...] = ()  # more Host names accepted on a loopback bind (--allowed-host)
    allowed_origins: tuple[str, ...] = ()  # pages elsewhere that may POST/PATCH, with CORS (--allowed-origin)
    # A session whose WebRTC connection is not up this long after its answer (or after the last candidates
    # its page trickled in, up to first_frame_timeout_s in all) is closed: it can never talk, only hold a seat.
    connect_timeout_s: float = 6.0
    max_pending_per_address: int = 2  # sessions not connected yet from one address (an IPv6 /64) at once
    max_connections_per_address: int = 32  # open HTTP connections from one address (429 and closed beyond)
    per_address_exempt: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # no per-address caps (this machine: benches)
    resume_ttl_s: float = 300.0  # an ended session's conversation may be continued this long (transport.resume)


@dataclass
class ApiResponse:
    """What a signalling call answers, whatever carries it (aiohttp here, a cluster's ingress)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def too_large(size: int | None, max_body: int) -> ApiResponse | None:
    """413 for a request body over the cap."""
    if size is not None and size > max_body:
        return ApiResponse(413, {"error": f"request body too large (at most {max_body} bytes)"})
    return None


def unauthorized(token: str | None, authorization: str | None) -> ApiResponse | None:
    """401 when the server wants a token (``--token``) and the request does not present it."""
    if token and not _bearer_ok(authorization, token):
        return ApiResponse(401, {"error": "this server needs a token: open the page with ?token=... (the "
                                          "operator's --token), or send Authorization: Bearer <token>"},
                           {"WWW-Authenticate": "Bearer"})
    return None


class _Unreadable(BadRequest):
    """A request body that could not be read to its end."""


class _TooSlow(Exception):
    """A request body that did not arrive within :data:`BODY_TIMEOUT_S`."""


def refuse_request(options: ServerOptions, method: str, scheme: str, host: str | None, origin: str | None,
                   content_type: str | None) -> ApiResponse | None:
    """What no web page may do, checked before anything else (here and in the cluster's ingress):

    - on a loopback bind, a ``Host`` that does not name this machine (``localhost``, ``*.localhost``, an IP
      address, or an ``allowed_hosts`` name) is a 403: a page whose name was rebound to 127.0.0.1 sends
      its own name;
    - a POST or PATCH whose ``Origin`` is present and is neither the page's own (this request's Host) nor
      one of ``allowed_origins`` is a 403: another site's page posting here;
    - a POST or PATCH whose ``Content-Type`` is not ``application/json`` is a 415, so a cross-site
      "simple" request (text/plain, no preflight) never reaches the API.

    A request without ``Host`` or ``Origin`` is no browser's and passes those checks."""
    if options.loopback_bind and host is not None and not _local_host(host, options.allowed_hosts):
        return ApiResponse(403, {"error": f"this server answers requests for this machine only, not for Host {host!r} "
                                          "(start it with --allowed-host NAME to accept that name)"})
    if method not in ("POST", "PATCH"):
        return None
    if foreign_origin(options, origin, host, scheme):
        return ApiResponse(403, {"error": f"requests from pages of {origin!r} are refused: only this server's own "
                                          "page may use its API (start it with --allowed-origin to accept another)"})
    if (content_type or "").split(";")[0].strip().lower() != "application/json":
        return ApiResponse(415, {"error": "send the request body as JSON with Content-Type: application/json"})
    return None


# On every answer: no page may frame this one (clickjacking the microphone button), no browser may
# guess a type other than the one sent, and the page's address (which may hold ?token=) is never sent on.
SECURITY_HEADERS = {"Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def unconnectable(sdp: str) -> str | None:
    """What an offer lacks to ever connect (None if nothing): ICE credentials (``a=ice-ufrag``,
    ``a=ice-pwd``) and a DTLS ``a=fingerprint`` for every media section it sends on, its own or the
    session's. aiortc accepts such an offer and fails later, in a task of its own."""
    sections: list[list[str]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append([])
        sections[-1].append(line.strip())
    used = [m for m in sections[1:] if m[0].split(" ")[1:2] != ["0"] and "a=bundle-only" not in m]
    for attribute in ("a=fingerprint:", "a=ice-ufrag:", "a=ice-pwd:"):
        def has(lines: list[str]) -> bool:
            return any(line.startswith(attribute) and line[len(attribute):].strip() for line in lines)

        if not has(sections[0]) and (not used or not all(has(m) for m in used)):
            return attribute.rstrip(":")
    return None


def _require_connectable(offer: Offer) -> None:
    lacking = unconnectable(offer.sdp)
    if lacking is not None:
        raise BadRequest(f"cannot use this offer: it has no {lacking} line, so it can never connect")


def not_open(pc_id: object) -> ApiResponse:
    """The 404 for candidates naming a connection that is not open, or not the sender's."""
    return ApiResponse(404, {"error": f"no open connection {pc_id} with this secret; post an offer first (the "
                                      "'secret' comes with its answer)"})


def status_refused(options: ServerOptions, authorization: str | None) -> ApiResponse | None:
    """401 for the status without the token when the server has one (the operator's admin token will do)."""
    if options.admin_token and _bearer_ok(authorization, options.admin_token):
        return None
    return unauthorized(options.token, authorization)


def cors_headers(options: ServerOptions, origin: str | None) -> dict[str, str]:
    """CORS headers for a request from one of ``allowed_origins`` (none for anyone else: no CORS by default)."""
    if origin is None or _origin(origin) not in _origins(options):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin", "Access-Control-Allow-Methods": "POST, PATCH",
            "Access-Control-Allow-Headers": "Content-Type, Authorization", "Access-Control-Max-Age": "600"}


def _origin(text: str) -> str:
    return text.strip().rstrip("/").lower()


def _origins(options: ServerOptions) -> set[str]:
    return {_origin(o) for o in options.allowed_origins}


def _split_host(host: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a Host header (``[::1]:8080`` included); None if it is not one."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit("//" + host.strip())
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return None


def _local_host(host: str, allowed: tuple[str, ...]) -> bool:
    import ipaddress

    split = _split_host(host)
    if split is None or not split[0]:
        return False
    name = split[0]
    if name == "localhost" or name.endswith(".localhost") or name in {a.lower() for a in allowed}:
        return True
    try:
        ipaddress.ip_address(name)  # an address cannot be rebound: a page there is at that address
    except ValueError:
        return False
    return True


def foreign_origin(options: ServerOptions, origin: str | None, host: str | None, scheme: str) -> bool:
    """Whether a request comes from another site's page: an ``Origin`` that is neither the page's own
    (this request's Host) nor one of ``allowed_origins`` (no Origin: no browser's page)."""
    return origin is not None and not _own_origin(origin, host, scheme) and _origin(origin) not in _origins(options)


def _own_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether ``origin`` is the origin of this server's page as the request names it (scheme aside: a
    proxy may end TLS in front of it)."""
    from urllib.parse import urlsplit

    defaults = {"http": 80, "https": 443}
    try:
        parts = urlsplit(origin.strip())
        origin_port = parts.port or defaults.get(parts.scheme)
    except ValueError:
        return False
    split = _split_host(host) if host is not None else None
    if split is None or not parts.hostname:
        return False
    name, port = split
    return parts.hostname.lower() == name and origin_port == (port or defaults.get(scheme))


class Site:
    """The page and the signalling API over HTTP (aiohttp), with every check of what a request may do.
    The signalling calls (:meth:`offer`, :meth:`candidates`, :meth:`status_of`) take the request's
    bytes and Authorization header and answer an :class:`ApiResponse`; :class:`Server` answers them
    with sessions of its own, the front of ``duplex serve --workers N``
    (:class:`duplex.transport.workers.Front`) by sending each to the worker process that owns it."""

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.app = self._build_app()

    # -- app ---------------------------------------------------------------------------------------

    def _build_app(self):
        from aiohttp import web

        @web.middleware
        async def errors(request, handler):
            return await self._errors(request, handler)

        # keepalive_timeout: aiohttp closes a connection whose next request's headers are not all in by
        # then (from connecting, or from its previous answer); its default is an hour. lingering_time: how
        # long it reads (and drops) the rest of a body it answered without reading, before closing.
        app = web.Application(client_max_size=self.options.max_body, middlewares=[errors],
                              handler_args={"keepalive_timeout": HEADER_TIMEOUT_S, "lingering_time": LINGER_S})
        app.router.add_post("/api/offer", self.post_offer)
        app.router.add_patch("/api/offer", self.patch_offer)
        app.router.add_get("/api/status", self.status)
        app.router.add_get("/v1/realtime", self.realtime)  # the OpenAI Realtime protocol (WebSocket)
        app.router.add_get("/", self.index)
        root = self.options.web_root
        if root.is_dir():
            app.router.add_get("/{name:[A-Za-z0-9_.-]+}", self.file)  # the page's files, one level, no paths
        else:
            log.warning("the web client folder %s is missing; only the API is served", root)
        app.on_startup.append(_raise_file_limit)
        app.on_startup.append(log_loop_errors)
        app.on_shutdown.append(lambda _app: self.close())
        return app

    def realtime_upgrade(self, request):
        """A ``GET /v1/realtime``: ``(the WebSocket to prepare, None)``, or ``(None, the refusal)`` for a page
        of another site, a wrong token or a request that is no WebSocket upgrade (seats are the caller's)."""
        from aiohttp import web

        headers = request.headers
        origin = headers.get("Origin")
        if foreign_origin(self.options, origin, headers.get("Host"), request.scheme):
            return None, self._json(403, {"error": f"WebSocket connections from pages of {origin!r} are refused (start "
                                                   "the server with --allowed-origin to accept them)"})
        refused = unauthorized(self.options.token, headers.get("Authorization"))
        if refused is not None:
            return None, self._respond(refused)
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=20.0)
        if not ws.can_prepare(request).ok:
            return None, self._json(400, {"error": "this endpoint speaks the Realtime protocol over a WebSocket: "
                                                   "connect with a WebSocket client (e.g. openai's "
                                                   "client.realtime.connect() with base_url http://HOST:PORT/v1)"})
        return ws, None

    @contextlib.asynccontextmanager
    async def on_loopback(self) -> AsyncIterator[str]:
        """Serve :attr:`app` on 127.0.0.1 and a free port in the running loop, for benchmarks and
        tests (plain aiohttp runner, no access log); yields the base URL, stops serving on exit."""
        from aiohttp import web

        runner = web.AppRunner(self.app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()

    def runner(self, **kwargs: Any) -> Runner:
        """The aiohttp runner to serve :attr:`app` with (kwargs: :class:`aiohttp.web.AppRunner`'s): each
        connection held to the per-address cap, aiohttp's own refusals as JSON (see :mod:`.connections`)."""
        return Runner(self.app, Limits(self.options.max_connections_per_address, self.options.per_address_exempt,
                                       SECURITY_HEADERS), **kwargs)

    @staticmethod
    def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None):
        from aiohttp import web

        return web.json_response(body, status=status, headers=headers)

    async def _errors(self, request, handler):
        """Every refusal as JSON ``{"error": message}``; nothing a client sends raises out of here. What
        no web page may do (:func:`refuse_request`) is refused before any handler runs."""
        headers = request.headers
        refused = refuse_request(self.options, request.method, request.scheme, headers.get("Host"),
                                 headers.get("Origin"), headers.get("Content-Type"))
        response = self._respond(refused) if refused is not None else await self._handle(request, handler)
        response.headers.update(SECURITY_HEADERS)
        if refused is None:
            response.headers.update(cors_headers(self.options, headers.get("Origin")))
        return response

    async def _handle(self, request, handler):
        from aiohttp import web

        try:
            if request.method == "OPTIONS" and request.path == "/api/offer" and cors_headers(
                    self.options, request.headers.get("Origin")):
                return web.Response(status=204)  # a preflight from an allowed origin
            response = await handler(request)
            if response.status >= 400 and response.content_type != "application/json":
                return self._json(response.status, {"error": _refusal(request, response.status, response.reason)})
            return response
        except BadRequest as exc:
            response = self._json(400, {"error": str(exc)})
            if isinstance(exc, _Unreadable):
                response.force_close()  # the connection ends with this answer
            return response
        except _TooSlow:
            response = self._json(408, {"error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"})
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            return self._json(413, {"error": f"request body too large (at most {self.options.max_body} bytes)"})
        except web.HTTPException as exc:
            if exc.status >= 400:  # every refusal has a JSON body, pages and files included
                return self._json(exc.status, {"error": _refusal(request, exc.status, exc.reason)}, headers={
                    k: v for k, v in exc.headers.items() if k.lower() == "allow"})
            raise
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return self._json(500, {"error": "internal error; see the server log"})

    async def _body(self, request) -> bytes:
        """The bytes of a request; 413 before reading anything when the declared size is over the cap
        (aiohttp enforces it too while reading a body sent without a length)."""
        from aiohttp import web

        if request.content_length is not None and request.content_length > self.options.max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=self.options.max_body, actual_size=request.content_length)
        try:
            return await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            _gone.log(f"{request.method} {request.path}: the body took over {BODY_TIMEOUT_S:g} s; answered 408")
            raise _TooSlow() from None
        except web.RequestPayloadError as exc:  # e.g. a Content-Encoding the body does not decode with
            request.content.feed_eof()  # nothing more is read from it (aiohttp would, and fail again)
            why = getattr(exc.__cause__, "message", None) or str(exc.__cause__ or exc)
            raise _Unreadable(f"cannot read the request body: {why.strip()}") from None
        except ConnectionResetError:  # the client left before its body was in
            _gone.log(f"{request.method} {request.path}: the client left before sending its whole body")
            raise BadRequest("the request body was cut short") from None

    def _respond(self, answer: ApiResponse):
        return self._json(answer.status, answer.body, headers=answer.headers or None)

    # -- handlers ----------------------------------------------------------------------------------

    async def index(self, request):
        from aiohttp import web

        page = self.options.web_root / "index.html"
        if not page.is_file():
            return self._json(404, {"error": f"the web client is missing ({page})"})
        return web.FileResponse(page, headers={"Cache-Control": "no-store"})

    async def file(self, request):
        """A file of the web client (index.html, app.js, style.css): JSON 404 for anything else."""
        from aiohttp import web

        name = request.match_info["name"]
        path = self.options.web_root / name
        if name.startswith(".") or not path.is_file():
            return self._json(404, {"error": f"no such page or file: {request.path}"})
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})

    async def status(self, request):
        authorization = request.headers.get("Authorization")
        return self._respond(status_refused(self.options, authorization) or await self.status_of(authorization))

    async def post_offer(self, request):
        return self._respond(await self.offer(await self._body(request), request.headers.get("Authorization"),
                                              request.remote))

    async def patch_offer(self, request):
        return self._respond(await self.candidates(await self._body(request), request.headers.get("Authorization")))

    # -- the signalling calls, answered by a subclass ----------------------------------------------

    async def offer(self, body: bytes, authorization: str | None = None, remote: str | None = None) -> ApiResponse:
        raise NotImplementedError

    async def candidates(self, body: bytes, authorization: str | None = None) -> ApiResponse:
        raise NotImplementedError

    async def status_of(self, authorization: str | None = None) -> ApiResponse:
        """``GET /api/status``."""
        raise NotImplementedError

    async def realtime(self, request):
        """``GET /v1/realtime`` (checked by :meth:`realtime_upgrade`, then served or relayed)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Runs when the app shuts down."""


class Server(Site):
    """Holds the agent, the open peers and the aiohttp application that serves them; the signalling
    calls are answered here, so a cluster replica or a serve worker answers them too."""

    def __init__(self, agent: Agent, options: ServerOptions | None = None) -> None:
        self.agent = agent
        self.peers: dict[str, Peer] = {}
        self.sockets: dict[str, RealtimeSocket] = {}  # conversations over /v1/realtime
        self.closed_peers = 0
        self.close_reasons: Counter[str] = Counter()  # why peers were closed, for status and tests
        self._opening = 0
        self._restarting: dict[str, Peer] = {}  # connections whose restart is being answered (the old peer)
        self._pending: dict[str, _Pending] = {}  # answered sessions whose connection is not up yet
        self._opening_from: Counter[str] = Counter()  # offers being answered, by address_key
        self._closing = False
        options = options or ServerOptions()
        self.resumable = ResumableConversations(options.resume_ttl_s, capacity=max(16, 4 * options.max_sessions))
        super().__init__(options)

    async def realtime(self, request):
        """``GET /v1/realtime``: a conversation over the OpenAI Realtime protocol
        (:mod:`duplex.transport.realtime_socket`), with the token, origin and seat checks of an offer."""
        ws, refused = self.realtime_upgrade(request)
        if refused is not None:
            return refused
        if self._closing:
            return self._json(503, {"error": "the server is shutting down"})
        if self.room() - self._opening <= 0:
            return self._json(503, {"error": f"the server is at its limit of {self.options.max_sessions} concurrent "
                                             "sessions; try again later"}, headers={"Retry-After": "10"})
        await ws.prepare(request)
        socket_id = new_socket_id()
        record = self.options.peer.record_dir
        session = self.agent.session(record=None if record is None else Path(record) / socket_id)
        sock = RealtimeSocket(socket_id, ws, session, lambda s: self.sockets.pop(s.id, None))
        self.sockets[socket_id] = sock
        log.info("realtime session %s opened from %s", socket_id, request.remote or "?",
                 extra={"event": "session_opened", "pc_id": socket_id, "sessions": len(self.peers) + len(self.sockets)})
        reason = await sock.run()
        log.info("realtime session %s closed: %s", socket_id, reason,
                 extra={"event": "session_closed", "pc_id": socket_id, "reason": reason})
        return ws

    def room(self) -> int:
        """Seats for new sessions (none while closing). Offers being answered are not subtracted: the
        cluster's ingress counts those it has sent itself."""
        return 0 if self._closing else self.options.max_sessions - len(self.peers) - len(self.sockets)

    def holds(self, pc_id: str) -> bool:
        """Whether connection ``pc_id`` is open here (or being restarted): an offer naming one that is
        not starts a new session."""
        return pc_id in self.peers or pc_id in self._restarting

    async def status_of(self, authorization: str | None = None) -> ApiResponse:
        return self.status_body(authorization)

    def status_body(self, authorization: str | None = None) -> ApiResponse:
        """Counts, states and limits; the connection ids only with the operator's token."""
        body: dict[str, Any] = {
            "sessions": len(self.peers) + len(self.sockets), "realtime_sessions": len(self.sockets),
            "max_sessions": self.options.max_sessions,
            "closed_sessions": self.closed_peers, "close_reasons": dict(self.close_reasons),
            "states": dict(Counter(p.session.state for p in self.peers.values())),
            "session_metrics": [dict(p.metrics) for p in self.peers.values()]}  # latencies, no ids
        if self.options.admin_token and _bearer_ok(authorization, self.options.admin_token):
            body["peers"] = {pid: {"connection": p.pc.connectionState, "state": p.session.state,
                                   "input_s": round(p.input.seconds, 2), "input_peak_rms": round(p.input.peak_rms, 4),
                                   "events_sent": p.sent}
                             for pid, p in self.peers.items()}
        return ApiResponse(200, body)

    def _owned(self, pc_id: str | None, secret: str | None) -> Peer | None:
        """Connection ``pc_id`` (open, or being restarted) if ``secret`` is the one its answer carried;
        None otherwise, so a connection of someone else's answers exactly as one that is not open."""
        peer = (self.peers.get(pc_id) or self._restarting.get(pc_id)) if pc_id else None
        if peer is None or secret is None or not _same(secret, peer.secret):
            return None
        return peer

    async def offer(self, body: bytes, authorization: str | None = None, remote: str | None = None) -> ApiResponse:
        """``POST /api/offer``: a new connection, a renegotiation or a restart (see the module docstring)."""
        try:
            return await self._offer(body, authorization, remote)
        except BadRequest as exc:
            return ApiResponse(400, {"error": str(exc)})
        except asyncio.TimeoutError:
            return ApiResponse(504, {"error": f"answering the offer took over {OFFER_TIMEOUT_S:g} s; try again"})

    async def candidates(self, body: bytes, authorization: str | None = None) -> ApiResponse:
        """``PATCH /api/offer``: trickled ICE candidates for a connection this request owns."""
        try:
            return await self._candidates(body, authorization)
        except BadRequest as exc:
            return ApiResponse(400, {"error": str(exc)})
        except asyncio.TimeoutError:
            return ApiResponse(504, {"error": f"adding the candidates took over {CANDIDATES_TIMEOUT_S:g} s (an mDNS "
                                              "'.local' address that does not resolve?); the others may be missing"})

    async def _offer(self, body: bytes, authorization: str | None, remote: str | None) -> ApiResponse:
        refused = too_large(len(body), self.options.max_body) or unauthorized(self.options.token, authorization)
        if refused is not None:
            return refused
        offer = parse_offer(parse_json(body))
        if self._closing:
            return ApiResponse(503, {"error": "the server is shutting down"})
        existing = self._owned(offer.pc_id, offer.secret)  # None: a new session, whatever pc_id it names
        if existing is not None and self._restarting.get(existing.pc_id) is existing:
            return ApiResponse(409, {"error": "a restart of this connection is already under way; use its answer"})
        if existing is not None and not offer.restart_pc:
            _require_connectable(offer)
            try:
                answer = await asyncio.wait_for(renegotiate(existing, offer), OFFER_TIMEOUT_S)
            except (ValueError, TypeError, KeyError, IndexError, AssertionError) as exc:
                raise BadRequest(f"cannot use this offer: {_why(exc)}") from None
            return ApiResponse(200, answer)
        if existing is None and len(self.peers) + len(self.sockets) + self._opening >= self.options.max_sessions:
            return ApiResponse(503, {"error": f"the server is at its limit of {self.options.max_sessions} "
                                              "concurrent sessions; try again later"}, {"Retry-After": "10"})
        key = address_key(remote)
        pending = self._opening_from[key] + sum(1 for p in self._pending.values() if p.key == key)
        if pending >= self.options.max_pending_per_address and not within(remote, self.options.per_address_exempt):
            return ApiResponse(429, {"error": f"{pending} sessions from your address are still connecting (at most "
                                              f"{self.options.max_pending_per_address} at once); try again when they "
                                              "are up or closed"},
                               {"Retry-After": f"{self.options.connect_timeout_s:.0f}"})
        _require_connectable(offer)
        self._opening_from[key] += 1
        self._opening += 1  # a seat held from here on (a restart keeps the one of the connection it replaces)
        if existing is not None:
            self._restarting[existing.pc_id] = existing
        # the conversation goes on: a restart's (ICE restart by a new connection), or the one the
        # offer's resume token names
        resume = self.resumable.take(offer.resume) if offer.resume and existing is None else None
        try:
            if existing is not None:
                await existing.close("restarted by the peer")
                resume = existing.session.conversation
            peer, answer = await asyncio.wait_for(
                open_peer(self.agent, offer, self.options.peer, self._forget, resume=resume), OFFER_TIMEOUT_S)
        except BaseException as exc:
            if resume is not None and existing is None and offer.resume:
                self.resumable.keep(offer.resume, resume)  # not taken after all: still there to continue
            if isinstance(exc, (ValueError, TypeError, KeyError, IndexError, AssertionError)):
                # aiortc's SDP parser reports what it cannot use this way
                raise BadRequest(f"cannot use this offer: {_why(exc)}") from None
            raise
        finally:
            self._opening -= 1
            self._opening_from[key] -= 1
            if not self._opening_from[key]:
                del self._opening_from[key]
            if existing is not None:
                self._restarting.pop(existing.pc_id, None)
        if self._closing:  # the server began to close while this offer was answered
            await peer.close("the server is shutting down")
            return ApiResponse(503, {"error": "the server is shutting down"})
        peer.secret = secrets.token_urlsafe(24)
        peer.resume_token = new_token()
        reply: dict[str, Any] = {**answer, "secret": peer.secret, "resume_token": peer.resume_token,
                                 "resumed": resume is not None}
        if offer.resume and existing is None and resume is None:
            reply["resume_refused"] = (f"no conversation to continue with this resume token (they work once, for "
                                        f"{self.options.resume_ttl_s:g} s after the connection ends): a new one "
                                        "has begun")
        self.peers[peer.pc_id] = peer
        if peer.closed:  # closed while answering (e.g. the session failed at once)
            self.peers.pop(peer.pc_id, None)
        else:
            self._watch_connection(peer, key)
        log.info("session %s opened from %s (%d/%d sessions)", peer.pc_id, remote or "?", len(self.peers),
                 self.options.max_sessions, extra={"event": "session_opened", "pc_id": peer.pc_id,
                                                   "sessions": len(self.peers)})
        return ApiResponse(200, reply)

    async def _candidates(self, body: bytes, authorization: str | None) -> ApiResponse:
        refused = too_large(len(body), self.options.max_body) or unauthorized(self.options.token, authorization)
        if refused is not None:
            return refused
        patch = parse_patch(parse_json(body))
        peer = self._owned(patch.pc_id, patch.secret)
        if peer is None or peer.pc_id not in self.peers:
            return not_open(patch.pc_id)
        try:
            await asyncio.wait_for(add_candidates(peer, patch.candidates), CANDIDATES_TIMEOUT_S)
        except (ValueError, TypeError) as exc:
            raise BadRequest(f"cannot use these candidates: {_why(exc)}") from None
        pending = self._pending.get(peer.pc_id)
        if pending is not None and patch.candidates:  # progress: the page is still gathering
            pending.extend(self.options.connect_timeout_s)
        return ApiResponse(200, {"pc_id": patch.pc_id, "added": len(patch.candidates)})

    # -- lifecycle ---------------------------------------------------------------------------------

    def _watch_connection(self, peer: Peer, key: str) -> None:
        """Close ``peer`` if its connection is not up within ``connect_timeout_s`` (see :class:`_Pending`)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(key, asyncio.Event(), loop.time() + self.options.connect_timeout_s,
                           loop.time() + self.options.peer.first_frame_timeout_s)

        @peer.pc.on("connectionstatechange")
        def _changed() -> None:
            if peer.pc.connectionState == "connected":
                pending.connected.set()

        if peer.pc.connectionState == "connected":
            return
        self._pending[peer.pc_id] = pending
        pending.task = asyncio.create_task(self._await_connection(peer, pending), name=f"{peer.pc_id}-connect")

    async def _await_connection(self, peer: Peer, pending: _Pending) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not pending.connected.is_set():
                left = pending.deadline - loop.time()
                if left <= 0:
                    peer.close_soon(NOT_CONNECTED)
                    return
                try:
                    await asyncio.wait_for(pending.connected.wait(), left)
                except asyncio.TimeoutError:
                    pass  # the deadline may have moved (candidates came in): look again
        finally:
            if self._pending.get(peer.pc_id) is pending:
                del self._pending[peer.pc_id]

    def _forget(self, peer: Peer) -> None:
        pending = self._pending.pop(peer.pc_id, None)
        if pending is not None and pending.task is not None and pending.task is not asyncio.current_task():
            pending.task.cancel()
        if self.peers.pop(peer.pc_id, None) is not None:
            if not self._closing and peer.resume_token and peer.pc_id not in self._restarting:
                self.resumable.keep(peer.resume_token, peer.session.conversation)
            self.closed_peers += 1
            self.close_reasons[peer.close_reason] += 1
            duration = time.monotonic() - peer.opened_at
            turns = sum(1 for t in peer.session.conversation.turns if t.role == "user")
            log.info("session %s closed after %.1f s, %d user turns: %s (%d open)", peer.pc_id, duration, turns,
                     peer.close_reason, len(self.peers),
                     extra={"event": "session_closed", "pc_id": peer.pc_id, "reason": peer.close_reason,
                            "duration_s": round(duration, 1), "user_turns": turns, "sessions": len(self.peers)})

    async def close(self) -> None:
        """Close every peer (and its session); refuse new offers from now on."""
        self._closing = True
        await asyncio.gather(*(p.close("the server is shutting down") for p in list(self.peers.values())),
                             *(s.close("the server is shutting down") for s in list(self.sockets.values())),
                             return_exceptions=True)
        watches = [p.task for p in self._pending.values() if p.task is not None]
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)


@dataclass
class _Pending:
    """A session answered but not connected yet: closed at ``deadline``, which candidates the page
    trickles in move on (never past ``latest``)."""

    key: str  # address_key of the page that offered it
    connected: asyncio.Event
    deadline: float  # loop time
    latest: float
    task: asyncio.Task | None = None

    def extend(self, seconds: float) -> None:
        now = asyncio.get_running_loop().time()
        self.deadline = min(max(self.deadline, now + seconds), self.latest)


def _refusal(request, status: int, reason: str) -> str:
    return f"no such page or file: {request.path}" if status == 404 else reason


def _bearer_ok(authorization: str | None, token: str) -> bool:
    header = authorization or ""
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    return bool(given) and _same(given, token)


def _same(given: str, expected: str) -> bool:
    """A constant-time comparison of any two strings (lone surrogates and undecodable bytes included)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass"))


_gone = RateLimitedLog(log, logging.INFO)  # clients that left mid-request
_webrtc_failed = RateLimitedLog(log, logging.WARNING)  # aiortc's own tasks failing on what a peer sent
_accept_failed = RateLimitedLog(log, logging.WARNING)  # the listening socket out of files


async def _raise_file_limit(app) -> None:
    limits = raise_file_limit()
    if limits is not None and limits[1] > limits[0]:
        log.info("open-file limit raised from %d to %d (connections and peers each take files)", *limits)


async def log_loop_errors(app) -> None:
    """What asyncio reports about the server, for as long as the app runs, one WARNING line each
    (rate-limited) instead of a traceback each; anything else goes on to the loop's handler as before:

    - aiortc runs a connection's ICE and DTLS setup in tasks of its own that nobody awaits, so a peer's
      bad parameters end there as "Task exception was never retrieved";
    - out of files, the listening socket's accept fails for every waiting connection (asyncio pauses
      accepting for a second, and reports each time)."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            _accept_failed.log(f"cannot accept connections: {context.get('exception')} (asyncio retries each "
                               "second; idle connections close within their header deadline)")
            return
        exc, task = context.get("exception"), context.get("future")
        coro = task.get_coro() if isinstance(task, asyncio.Task) else None
        where = getattr(getattr(coro, "cr_code", None), "co_filename", "")
        if exc is not None and {"aiortc", "aioice"} & set(Path(where).parts):
            _webrtc_failed.log(f"a WebRTC connection failed inside aiortc ({getattr(coro, '__qualname__', '?')}): "
                               f"{type(exc).__name__}: {exc}")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)

    async def restore(_app) -> None:
        if loop.get_exception_handler() is handle:
            loop.set_exception_handler(previous)

    app.on_cleanup.append(restore)


def _why(exc: Exception) -> str:
    text = str(exc)
    return text if text else f"the WebRTC stack could not parse it ({type(exc).__name__})"
