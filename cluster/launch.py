"""Start and stop the cluster application: Ray (local, or joining ``--ray-address``), Serve's HTTP
proxy on ``host:port``, the app of :mod:`.app`; and ``duplex serve --replicas N`` on top."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from duplex.cluster.app import ClusterOptions, build
from duplex.config import AgentConfig
from duplex.errors import ConfigError, UserError
from duplex.requirements import import_extra

log = logging.getLogger(__name__)

# What the replicas must see as this process does: where tiny models are cached, no hub downloads.
PASSED_ENV = ("DUPLEX_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def _ray() -> Any:
    import_extra("ray.serve", "duplex serve --replicas")
    import ray

    return ray


@dataclass
class Cluster:
    """A running cluster app: its URL, its options, and the Ray it runs on."""

    url: str
    options: ClusterOptions
    started_ray: bool  # this process started Ray (and stops it)
    joined: bool = False  # Ray runs elsewhere (--ray-address): its processes are not this one's to stop
    _processes: dict[int, str | None] = field(default_factory=dict)  # pid: its start time (see remember())

    def handle(self, replica: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(replica, app_name=self.options.app_name)

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.delete(self.options.app_name)
        if self.started_ray:
            serve.shutdown()
            ray.shutdown()

    def kill(self, grace_s: float = 0.5) -> None:
        """Stop at once (Ctrl-C, SIGTERM). A Ray this process started goes with every process it started:
        SIGTERM, then SIGKILL for those left after ``grace_s`` (Ray's agents ignore SIGTERM, and a terminal's
        Ctrl-C reaches Ray's head processes too, orphaning their children: see :meth:`remember`). No
        graceful Serve shutdown, which took over 40 s. On a cluster it joined, only this app is deleted."""
        from ray import serve

        if self.joined or not self.started_ray:
            serve.delete(self.options.app_name)
            return
        ours = {pid for pid, born in self._processes.items() if _started_at(pid) == born}  # not a pid reused since
        ours |= set(_descendants(os.getpid()))
        _signal_all(ours, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
            time.sleep(0.05)
        _signal_all({pid for pid in ours if _alive(pid)}, signal.SIGKILL)

    def remember(self) -> None:
        """Note the processes Ray runs for this one now (its head, agents, replicas), so :meth:`kill` finds
        them even after their parent is gone."""
        self._processes = {pid: _started_at(pid) for pid in _descendants(os.getpid())}


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _started_at(pid: int) -> str | None:
    """When ``pid`` started (clock ticks after boot, from /proc), to tell it from a later process given its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, theirs, ...), from /proc; none where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return []
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def start(config: AgentConfig, options: ClusterOptions, *, host: str = "127.0.0.1", port: int = 8080,
          address: str | None = None, cert: str | None = None, key: str | None = None,
          quiet: bool = False) -> Cluster:
    """Start (or join) Ray, put Serve's proxy on ``host:port`` and run the app; returns once every
    replica is up (their models load in the background: they take sessions when loaded)."""
    ray = _ray()
    from ray import serve

    if options.replicas < 1:
        raise ConfigError(f"--replicas must be at least 1, got {options.replicas}")
    started = not ray.is_initialized()
    if started:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=not quiet,
                     logging_level=logging.WARNING, runtime_env={"env_vars": {
                         k: os.environ[k] for k in PASSED_ENV if k in os.environ}})
        except ConnectionError as exc:
            raise UserError(f"cannot join the Ray cluster at {address}: {exc} (start it with `ray start --head`)"
                            ) from None
    gpus = float(ray.cluster_resources().get("GPU", 0))
    need = options.replicas * options.gpus_per_replica
    if need > gpus:
        if started:
            ray.shutdown()
        raise ConfigError(f"{options.replicas} replicas with {options.gpus_per_replica:g} GPU each need {need:g} "
                          f"GPUs; the Ray cluster has {gpus:g}. Use fewer --replicas, or --gpus-per-replica 0 "
                          "to run on CPUs")
    http: dict[str, Any] = {"host": host, "port": port}
    if cert or key:
        if not (cert and key):
            raise ConfigError("HTTPS needs both --cert and --key")
        http.update(ssl_certfile=cert, ssl_keyfile=key)
    serve.start(http_options=http, proxy_location="HeadOnly")
    serve.run(build(config, options), name=options.app_name, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return Cluster(f"{'https' if cert else 'http'}://{shown}:{port}", options, started,
                   joined=address is not None or "RAY_ADDRESS" in os.environ)


def wait_ready(cluster: Cluster, timeout_s: float = 600.0) -> None:
    """Block until every replica has loaded its models (or one failed to)."""
    deadline = time.monotonic() + timeout_s
    for name in cluster.options.names():
        handle = cluster.handle(name)
        while True:
            status = handle.status.remote(None).result(timeout_s=30)
            if status.get("failure"):
                raise UserError(f"replica {name} could not load its models: {status['failure']}")
            if not status.get("loading"):
                break
            if time.monotonic() > deadline:
                raise UserError(f"replica {name} is still loading its models after {timeout_s:.0f} s")
            time.sleep(0.5)


def serve_main(args: Any, config: AgentConfig) -> int:
    """``duplex serve --replicas N``: run until Ctrl-C or SIGTERM, which stop it at once (see
    :meth:`Cluster.kill`), also while Ray is still starting."""
    from duplex.transport.ice import is_loopback_host
    from duplex.transport.peer import peer_options_from_args
    from duplex.transport.server import ServerOptions

    _stop_on_signals()
    cluster: Cluster | None = None
    started_ray = False
    local = args.ray_address is None and "RAY_ADDRESS" not in os.environ  # a Ray of its own on this machine
    try:
        gpus = args.gpus_per_replica
        if gpus is None:  # one GPU per replica where the cluster has them
            ray = _ray()
            if not ray.is_initialized():
                started_ray = local
                ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= args.replicas else 0.0
        options = ClusterOptions(
            replicas=args.replicas, gpus_per_replica=gpus,
            server=ServerOptions(max_sessions=args.max_sessions, token=args.token, admin_token=args.admin_token,
                                 loopback_bind=is_loopback_host(args.host),
                                 allowed_hosts=tuple(args.allowed_host or ()),
                                 allowed_origins=tuple(args.allowed_origin or ()),
                                 peer=peer_options_from_args(args)),
            loopback=is_loopback_host(args.host))
        cluster = start(config, options, host=args.host, port=args.port, address=args.ray_address,
                        cert=args.cert, key=args.key)
        cluster.started_ray = cluster.started_ray or started_ray
        _stop_on_signals()  # again: Ray's driver sets its own SIGTERM handler
        print(f"duplex serve: {args.replicas} replicas ({gpus:g} GPU each), loading their models ...", flush=True)
        wait_ready(cluster)
        cluster.remember()
        link = cluster.url + "/" + (f"?token={args.token}" if args.token else "")
        print(f"duplex serve: open {link} in a browser (profile {config.profile}, {args.replicas} replicas of at "
              f"most {args.max_sessions} sessions); status at {cluster.url}/api/status, metrics at "
              f"{cluster.url}/metrics; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        began = time.monotonic()
        if cluster is not None:
            cluster.kill()
        elif local:  # stopped (or failed) while Ray was starting: whatever it started goes
            _signal_all(set(_descendants(os.getpid())), signal.SIGKILL)
        log.info("stopped in %.1f s", time.monotonic() - began)
    print("duplex serve: stopped", file=sys.stderr)
    return 0


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both raise KeyboardInterrupt in the main thread (so :func:`serve_main` stops
    the same way for both)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)


