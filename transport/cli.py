"""``duplex serve`` and ``duplex mic``: load the agent, run the transport until Ctrl-C, shut down cleanly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from duplex.config import AgentConfig
from duplex.errors import ConfigError, UserError

if TYPE_CHECKING:
    from duplex.transport.peer import PeerOptions


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event):
    """Ctrl-C / SIGTERM set ``stop`` (so shutdown runs in order) instead of raising somewhere."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or not supported here
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def tls_context(cert: str | None, key: str | None):
    """An SSL context serving ``cert``/``key``, None without them; clear errors for a bad pair."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("HTTPS needs both --cert and --key")
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use --cert {cert} / --key {key}: {exc}") from None
    return context


async def serve(config: AgentConfig, host: str, port: int, max_sessions: int, *,
                stop: asyncio.Event | None = None, on_ready: Callable[[str], None] | None = None,
                token: str | None = None, admin_token: str | None = None, tls=None,
                allowed_hosts: tuple[str, ...] = (), allowed_origins: tuple[str, ...] = (),
                workers: int | None = None, peer: PeerOptions | None = None) -> None:
    """Run the WebRTC server until ``stop`` is set (or Ctrl-C), then close every session and the models.
    With ``workers``, the sessions run in that many worker processes around one engine core process
    (:mod:`duplex.transport.workers`), ``max_sessions`` in all."""
    from aiohttp import web

    from duplex.transport.ice import is_loopback_host
    from duplex.transport.peer import PeerOptions
    from duplex.transport.server import ServerOptions

    stop = stop or asyncio.Event()
    try:  # bind first: a busy port fails at once, not after loading the models
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
                        "or stop the program using it") from None
    runner = None
    loopback = is_loopback_host(host)
    options = ServerOptions(max_sessions=max_sessions, token=token, admin_token=admin_token, loopback_bind=loopback,
                            allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
                            peer=peer or PeerOptions())
    try:
        site, owner = await _answering(config, options, workers, loopback=loopback)
    except BaseException:
        sock.close()
        raise
    try:
        runner = site.runner(handle_signals=False, access_log=None)  # connection limits: see transport.connections
        await runner.setup()
        await web.SockSite(runner, sock, ssl_context=tls).start()
        bound_port = runner.addresses[0][1] if runner.addresses else port
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        url = f"{'https' if tls else 'http'}://{shown}:{bound_port}/" + (f"?token={token}" if token else "")
        if on_ready is not None:
            on_ready(url)
        else:
            spread = f" over {workers} worker processes" if workers else ""
            print(f"duplex serve: open {url} in a browser (profile {config.profile}, at most {max_sessions} "
                  f"sessions{spread}); Ctrl-C stops", flush=True)
            if not is_loopback_host(host) and tls is None:
                print("duplex serve: browsers give the microphone only to https:// pages or localhost; "
                      "from another machine, use --cert/--key, an SSH tunnel (ssh -L) or an HTTPS proxy",
                      flush=True)
            if not is_loopback_host(host) and token is None:
                print("duplex serve: anyone who can reach this address can open sessions; --token limits "
                      "that to those you give the page's ?token= link", flush=True)
        with _stop_on_signals(stop):
            await stop.wait()
    finally:
        if runner is not None:
            await runner.cleanup()  # runs the app's on_shutdown: every peer and session closed
        sock.close()  # (already closed by the site when it started)
        await owner.aclose()  # the agent, or the workers' engine core


async def _answering(config: AgentConfig, options, workers: int | None, *, loopback: bool):
    """What answers the HTTP API, and what to close after it: a server and its agent in this process,
    or (``workers``) the front over that many worker processes and their engine core."""
    from duplex.agent import Agent
    from duplex.transport.ice import allow_loopback_candidates
    from duplex.transport.server import Server

    if loopback:
        allow_loopback_candidates()  # clients are on this machine, which may have no other interface
    if workers is None:
        agent = await Agent.load(config)
        return Server(agent, options), agent
    from duplex.transport.workers import Front

    return await Front.start(config, options, workers, loopback=loopback)


def serve_main(args: argparse.Namespace) -> int:
    from duplex.cli import config_from_args

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    if not 1 <= args.max_sessions <= 1000:
        raise ConfigError(f"--max-sessions must be 1-1000, got {args.max_sessions}")
    if args.workers is not None and not 1 <= args.workers <= args.max_sessions:
        raise ConfigError(f"--workers must be 1 to --max-sessions ({args.max_sessions}), got {args.workers}")
    if args.workers is not None and args.replicas is not None:
        raise ConfigError("--workers and --replicas do not go together: each replica is one agent process")
    config = config_from_args(args)
    if args.replicas is not None:
        from duplex.cluster.launch import serve_main as serve_cluster

        return serve_cluster(args, config)
    from duplex.transport.peer import peer_options_from_args

    tls = tls_context(args.cert, args.key)
    asyncio.run(serve(config, args.host, args.port, args.max_sessions, token=args.token,
                      admin_token=args.admin_token, tls=tls, allowed_hosts=tuple(args.allowed_host or ()),
                      allowed_origins=tuple(args.allowed_origin or ()), workers=args.workers,
                      peer=peer_options_from_args(args)))
    print("duplex serve: stopped", file=sys.stderr)
    return 0


def mic_main(args: argparse.Namespace) -> int:
    from duplex.transport import devices

    if args.list_devices:
        print(devices.describe_devices())
        return 0
    from duplex.cli import config_from_args
    from duplex.transport.mic import run_mic

    config = config_from_args(args)
    inp, out = devices.pick_devices(args.input_device, args.output_device)  # fail before loading models
    asyncio.run(run_mic(config, inp, out, record=args.record))
    print("duplex mic: stopped", file=sys.stderr)
    return 0
