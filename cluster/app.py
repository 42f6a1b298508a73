"""The Ray Serve application of ``duplex serve --replicas N``: N agent replicas behind one ingress.

- :class:`AgentReplica` (deployments ``agent-0`` .. ``agent-{N-1}``, one replica each, one GPU each
  where the cluster has GPUs): a whole agent, its engines and the aiortc peers of the sessions it
  owns, answering signalling through the same :class:`~duplex.transport.server.Server` a single
  ``duplex serve`` runs (ownership secrets, tokens, limits, error bodies: one implementation). Media
  flows between the browser and this replica directly, on the replica's host and its own ICE
  candidates.
- :class:`Ingress` (Serve's HTTP proxy in front): the page's files, and signalling routed by
  :mod:`.routing`: a new session to the replica with the most free capacity, every follow-up to the
  replica its id names; ``/api/status`` with ``replicas`` and ``/metrics`` in Prometheus' format.

Separately named deployments (not one deployment of N replicas) because a session's follow-ups must
reach exactly the replica holding its peer, and Serve routes calls within a deployment as it likes.
Ray restarts a replica that dies (its sessions end; their pages reconnect to another one), and
:meth:`AgentReplica.check_health` fails a replica whose models could not load.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duplex.cluster.routing import ReplicaDown, Router, cluster_status, prometheus
from duplex.config import AgentConfig
from duplex.transport.server import (BODY_TIMEOUT_S, SECURITY_HEADERS, ApiResponse, ServerOptions, cors_headers,
                                     refuse_request, status_refused, too_large, unauthorized)

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 25.0  # a signalling call to a replica (an offer takes well under a second)
STATUS_TIMEOUT_S = 2.0  # a capacity or status question; a replica slower than this counts as down
FILES = {"": "index.html", "index.html": "index.html", "app.js": "app.js", "style.css": "style.css"}
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


@dataclass
class ClusterOptions:
    replicas: int = 2
    gpus_per_replica: float = 0.0  # 1 on a GPU cluster: Ray gives each replica its own device
    cpus_per_replica: float = 0.1
    server: ServerOptions = field(default_factory=ServerOptions)  # per replica (max_sessions: each)
    loopback: bool = False  # clients are on this machine: offer loopback ICE candidates too
    app_name: str = "duplex"
    log_level: str = "info"  # duplex's loggers in each replica (sessions opened and closed, failures)

    def names(self) -> list[str]:
        return [f"agent-{i}" for i in range(self.replicas)]


class AgentReplica:
    """One agent and its sessions (see the module docstring). Methods are called by the ingress.

    Every method is ``async``: Serve runs those on the replica's event loop, where the peers live (it
    would run a plain method on a worker thread, racing the loop)."""

    def __init__(self, config: AgentConfig, options: ClusterOptions) -> None:
        from duplex.transport.ice import allow_loopback_candidates

        if options.loopback:
            allow_loopback_candidates()
        _log_to_stderr(options.log_level)
        self.config, self.options = config, options
        self.server: Any = None  # the Server, once the agent is loaded
        self.failure: str | None = None
        self._loading = asyncio.get_running_loop().create_task(self._load())

    async def _load(self) -> None:
        from duplex.agent import Agent
        from duplex.transport.server import Server

        try:
            agent = await Agent.load(self.config)
        except Exception as exc:
            log.exception("loading the agent failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            return
        self.server = Server(agent, self.options.server)

    async def check_health(self) -> None:
        """Serve calls this; raising makes Ray replace the replica."""
        if self.failure is not None:
            raise RuntimeError(f"the agent could not load: {self.failure}")

    async def _ready(self) -> Any:
        await asyncio.shield(self._loading)
        if self.server is None:
            raise RuntimeError(f"the agent could not load: {self.failure}")
        return self.server

    async def capacity(self, session: str | None = None) -> dict[str, Any]:
        """Room for new sessions, and whether connection ``session`` (this replica's own id) is open."""
        server = self.server
        if server is None:
            return {"ready": False, "free": 0, "holds": False}
        return {"ready": True, "free": server.room(), "holds": session is not None and server.holds(session)}

    async def offer(self, body: bytes, authorization: str | None, remote: str | None) -> ApiResponse:
        return await (await self._ready()).offer(body, authorization, remote)

    async def candidates(self, body: bytes, authorization: str | None) -> ApiResponse:
        return await (await self._ready()).candidates(body, authorization)

    async def status(self, authorization: str | None) -> dict[str, Any]:
        import ray

        if self.server is None:
            body: dict[str, Any] = {"sessions": 0, "max_sessions": 0, "loading": self.failure is None,
                                    "failure": self.failure}
        else:
            body = self.server.status_body(authorization).body
        body["node"] = ray.util.get_node_ip_address()
        body["pid"] = os.getpid()
        body["device"] = _device()
        return body

    async def actor_name(self) -> str:
        """The Ray actor holding this replica (for an operator, or a test, to kill it)."""
        from ray import serve

        ctx = serve.get_replica_context()
        return f"SERVE_REPLICA::{ctx.app_name}#{ctx.deployment}#{ctx.replica_tag}"

    async def __del__(self) -> None:  # Serve calls this when it stops the replica
        if self.server is not None:
            await self.server.close()
            await self.server.agent.aclose()


def _log_to_stderr(level: str) -> None:
    """duplex's log lines in the replica's stderr (Ray keeps it in its logs folder)."""
    logger = logging.getLogger("duplex")
    logger.setLevel(getattr(logging, level.upper()))
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _device() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"kind": "cpu"}
    return {"kind": "cuda", "name": torch.cuda.get_device_name(0),
            "gpu_memory_allocated_bytes": int(torch.cuda.memory_allocated()),
            "gpu_memory_reserved_bytes": int(torch.cuda.memory_reserved())}


async def _capped_body(request: Any, cap: int) -> bytes | ApiResponse:
    """The request's body, or the 413 once it is over ``cap`` bytes: refused by its declared length
    before anything is read, or while reading a body sent without one."""
    try:
        declared = int(request.headers.get("content-length") or 0)
    except ValueError:
        declared = 0
    refused = too_large(declared, cap)
    if refused is not None:
        return refused
    from starlette.requests import ClientDisconnect

    chunks: list[bytes] = []

    async def read() -> ApiResponse | None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            refused = too_large(size, cap)
            if refused is not None:
                return refused
            chunks.append(chunk)
        return None

    try:
        refused = await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except ClientDisconnect:  # nobody is left to answer: one line, not a traceback
        log.info("%s %s: the client left before sending its whole body", request.method, request.url.path)
        return ApiResponse(400, {"error": "the request body was cut short"})
    except asyncio.TimeoutError:  # a body sent a byte at a time
        log.info("%s %s: the body took over %g s; answered 408", request.method, request.url.path, BODY_TIMEOUT_S)
        return ApiResponse(408, {"error": f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"},
                           {"Connection": "close"})
    return refused if refused is not None else b"".join(chunks)


class Ingress:
    """Serve's HTTP entry point: the page and the signalling API, routed to the replicas."""

    def __init__(self, options: ClusterOptions, *agents: Any) -> None:
        self.options = options
        self.names = options.names()
        self.agents = dict(zip(self.names, agents))  # name -> DeploymentHandle
        self.web_root = Path(options.server.web_root)
        self.router = Router(self.names, self._call, call_timeout_s=CALL_TIMEOUT_S, status_timeout_s=STATUS_TIMEOUT_S)

    async def __call__(self, request: Any) -> Any:
        path, method, headers = request.url.path, request.method, request.headers
        refused = refuse_request(self.options.server, method, request.url.scheme, headers.get("host"),
                                 headers.get("origin"), headers.get("content-type"))
        if refused is None and path in ("/api/status", "/metrics"):
            refused = status_refused(self.options.server, headers.get("authorization"))
        response = _json(refused) if refused is not None else await self._answer(request, path, method)
        response.headers.update(SECURITY_HEADERS)
        if refused is None:
            response.headers.update(cors_headers(self.options.server, headers.get("origin")))
        return response

    async def _answer(self, request: Any, path: str, method: str) -> Any:
        try:
            if path == "/api/offer" and method == "OPTIONS" and cors_headers(self.options.server,
                                                                             request.headers.get("origin")):
                return _text(204, "", "text/plain")  # a preflight from an allowed origin
            if path == "/api/offer" and method in ("POST", "PATCH"):
                answer = await self._offer_request(method, request)
            elif path == "/api/offer":
                answer = ApiResponse(405, {"error": f"{method} is not allowed here: POST an offer or PATCH "
                                                    "candidates"}, {"Allow": "POST, PATCH"})
            elif path == "/api/status" and method == "GET":
                answer = ApiResponse(200, cluster_status(await self.router.statuses(request.headers.get("authorization"))))
            elif path == "/metrics" and method == "GET":
                return _text(200, prometheus(await self.router.statuses(None)), "text/plain; version=0.0.4")
            elif path == "/v1/realtime":
                answer = ApiResponse(501, {"error": "the Realtime WebSocket is not served through --replicas yet; "
                                                    "connect to a duplex serve of one process or --workers N"})
            elif method == "GET" and path.lstrip("/") in FILES:
                return self._file(FILES[path.lstrip("/")])
            else:
                answer = ApiResponse(404, {"error": f"no such page or file: {path}"})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s %s failed", method, path)
            answer = ApiResponse(500, {"error": "internal error; see the ingress log"})
        return _json(answer)

    # -- signalling ---------------------------------------------------------------------------------

    async def _offer_request(self, method: str, request: Any) -> ApiResponse:
        """POST or PATCH /api/offer: the size, then the token, before anything is parsed or routed
        (as a single server does)."""
        authorization = request.headers.get("authorization")
        body = await _capped_body(request, self.options.server.max_body)
        if isinstance(body, ApiResponse):
            return body
        refused = unauthorized(self.options.server.token, authorization)
        if refused is not None:
            return refused
        return await self.router.signal(method, body, authorization, request.client.host if request.client else None)

    async def _call(self, name: str, method: str, args: tuple[Any, ...]) -> Any:
        """One call to replica ``name`` through its Serve handle (the router's carrier)."""
        from ray.exceptions import RayActorError

        try:
            return await getattr(self.agents[name], method).remote(*args)
        except RayActorError as exc:  # dead, or being replaced
            raise ReplicaDown(f"{type(exc).__name__}") from exc

    # -- the page -----------------------------------------------------------------------------------

    def _file(self, name: str) -> Any:
        from starlette.responses import Response

        path = self.web_root / name
        if not path.is_file():
            return _json(ApiResponse(404, {"error": f"the web client is missing ({path})"}))
        return Response(path.read_bytes(), 200, {"Cache-Control": "no-store"},
                        media_type=TYPES.get(path.suffix, "application/octet-stream"))


def _json(answer: ApiResponse) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(answer.body, answer.status, answer.headers or None)


def _text(status: int, text: str, media_type: str) -> Any:
    from starlette.responses import Response

    return Response(text, status, media_type=media_type)


def build(config: AgentConfig, options: ClusterOptions) -> Any:
    """The Serve application: the ingress bound to one deployment per replica."""
    from ray import serve

    replica = serve.deployment(
        num_replicas=1, max_ongoing_requests=64, health_check_period_s=2.0, health_check_timeout_s=10.0,
        graceful_shutdown_timeout_s=5.0,
        ray_actor_options={"num_cpus": options.cpus_per_replica, "num_gpus": options.gpus_per_replica},
    )(AgentReplica)
    ingress = serve.deployment(num_replicas=1, max_ongoing_requests=200, ray_actor_options={"num_cpus": 0.1})(Ingress)
    agents = [replica.options(name=name).bind(config, options) for name in options.names()]
    return ingress.bind(options, *agents)


