"""``duplex bench capacity``: how many WebRTC sessions one server holds in real time.

The same sweep as ``bench e2e`` (1, 2, 4, 8, ... sessions, stopping after two sizes that fail), but
each session is a real aiortc peer talking over loopback to the server ``duplex serve`` runs (its
:class:`~duplex.transport.server.Server` and agent, in this process), so the figures include Opus,
SRTP, the jitter buffers and the data channel. The peers run in child processes of their own, up
to ``PEERS_PER_PROCESS`` in each (``python -m duplex.transport.capacity peers URL N``), so this
process's CPU seconds are the server's (with ``--engine-core process``, the engine core's are
reported apart, and the peers' are their processes' together).

Each peer says JFK's "And so my fellow Americans" and waits for the whole answer. Per size, the row
of :func:`duplex.e2e.concurrency_row`: the server sessions' input lag (sampled every 0.1 s, p99 and
max), reply-audio gaps in their playouts, voice-to-voice at the peer's ear (the end of its speech
leaving to the first loud frame of the answer out of its decoder; one monotonic clock serves both
processes), each engine's tick times, GPU busy, CPU seconds per second of the server and of the
peers' processes, and LLM listens per session-second; plus the peers that got no session or no answer.

Run: ``duplex bench capacity --profile tiny`` (results in ``<out>/capacity.json``); ``--batch 1 8 16``
picks the sizes (default: 1, 2, 4, 8 on the CPU, up to 64 on a GPU); ``--workers N`` runs the sessions
as ``duplex serve --workers N`` does (worker processes around one engine core; their CPU is reported
as ``workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from duplex.e2e import ConcurrencyRow

ANSWER_TIMEOUT_S = 90.0  # a peer whose answer has not finished by then counts as unanswered
# peers a child process runs: one Python process of aiortc peers (Opus both ways, SRTP, a data
# channel each) fills its core long before 64 of them, and the bench would measure the peers
PEERS_PER_PROCESS = 8
LOUD_RMS = 0.03  # a 20 ms block this loud is speech (the file track's own threshold)
HEARD_PEAK = 0.01  # an agent frame with a sample this loud is heard


def _phrase() -> np.ndarray:
    """JFK's "And so my fellow Americans" at 48 kHz, then silence while the agent answers."""
    from duplex.audio import SAMPLE_SPEECH, read_audio

    pcm, _ = read_audio(SAMPLE_SPEECH, 48_000)
    return np.concatenate([pcm[int(0.2 * 48_000):int(2.4 * 48_000)], np.zeros(int(ANSWER_TIMEOUT_S) * 48_000,
                                                                             np.float32)])


def _loud_span_s(pcm: np.ndarray, rate: int = 48_000) -> float:
    """Seconds from the start of the first loud 20 ms block to the end of the last one."""
    step = rate // 50
    blocks = pcm[:len(pcm) // step * step].reshape(-1, step)
    loud = np.flatnonzero(np.sqrt(np.mean(blocks.astype(np.float64) ** 2, axis=1)) > LOUD_RMS)
    return 0.0 if loud.size == 0 else (loud[-1] + 1 - loud[0]) * step / rate


async def _peers(url: str, n: int) -> dict[str, Any]:
    """The child process: ``n`` peers at once, each saying the phrase and waiting for the answer."""
    from duplex.transport.client import connect, file_track
    from duplex.transport.ice import allow_loopback_candidates

    allow_loopback_candidates()
    phrase = _phrase()
    span = _loud_span_s(phrase)
    cpu0 = time.process_time()

    async def one() -> dict[str, Any]:
        mic = file_track(phrase)
        row: dict[str, Any] = {"created": False, "answered": False, "v2v_ear_s": None}
        try:
            client = await connect(url, mic)
        except Exception as exc:  # refused (no seat) or failed: counted, the others go on
            row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            return row
        try:
            await client.wait_for("session.created", timeout=20)
            row["created"] = True
            await client.wait_for("response.done", timeout=ANSWER_TIMEOUT_S)
            row["answered"] = True
            if mic.first_loud_wall is not None:
                end = mic.first_loud_wall + span
                heard = next((w for w, f in zip(client.frame_walls, client.frames)
                              if w >= end and np.abs(f).max() > HEARD_PEAK), None)
                row["v2v_ear_s"] = None if heard is None else round(heard - end, 4)
        except asyncio.TimeoutError:
            pass
        finally:
            with contextlib.suppress(Exception):
                await client.close()
        return row

    rows = await asyncio.gather(*(one() for _ in range(n)))
    return {"peers": rows, "cpu_s": time.process_time() - cpu0}


class CapacityRow(ConcurrencyRow):
    """A size of the sweep, plus what the peers saw: those that got no session, or no whole answer."""

    no_session: int
    unanswered: int
    peer_processes: int


async def _sessions(server) -> dict[str, tuple[float, int]]:
    """Each open session's input lag and reply-audio gaps so far, by id: the server's own, or (a
    ``--workers`` front) every worker's."""
    from duplex.transport.workers import Front

    if isinstance(server, Front):
        return await server.sessions()
    return {pc_id: (p.session.lag_s, p.session.playout.underruns) for pc_id, p in list(server.peers.items())}


def _workers_cpu(server) -> Callable[[], float] | None:
    """The CPU seconds the front's workers use from now on (None without workers)."""
    from duplex.e2e import process_cpu_s
    from duplex.transport.workers import Front

    if not isinstance(server, Front):
        return None
    pids = [w.pid for w in server.workers.values() if w.pid is not None]
    start = {pid: process_cpu_s(pid) or 0.0 for pid in pids}
    return lambda: sum((process_cpu_s(pid) or start[pid]) - start[pid] for pid in pids)


async def _run_peers(url: str, n: int) -> dict[str, Any]:
    """``n`` peers in child processes of up to ``PEERS_PER_PROCESS`` each, all started at once; their
    rows together and their CPU seconds summed."""
    shares = [PEERS_PER_PROCESS] * (n // PEERS_PER_PROCESS) + ([n % PEERS_PER_PROCESS] if n % PEERS_PER_PROCESS
                                                               else [])
    children = [await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duplex.transport.capacity", "peers", url, str(k), stdout=asyncio.subprocess.PIPE)
        for k in shares]
    try:
        outs = await asyncio.gather(*(child.communicate() for child in children))
    finally:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
    rows: list[dict[str, Any]] = []
    cpu_s = 0.0
    for child, (out, _) in zip(children, outs):
        if child.returncode != 0 or not out.strip():
            raise RuntimeError(f"a peers' process failed (exit {child.returncode}); its traceback is above")
        result = json.loads(out.decode().strip().splitlines()[-1])
        rows += result["peers"]
        cpu_s += result["cpu_s"]
    return {"peers": rows, "cpu_s": cpu_s, "processes": len(children)}


async def measure(server, agent, url: str, n: int) -> CapacityRow:
    """``n`` peers (child processes) against ``server``; the sweep row, plus the peers' outcomes."""
    from duplex.clock import now
    from duplex.e2e import concurrency_row, core_cpu, engine_probe, gpu_sampling

    lags: list[float] = []
    underruns: dict[str, int] = {}
    workers_cpu = _workers_cpu(server)
    probe, core = await engine_probe(agent, workers=workers_cpu is not None), core_cpu(agent)
    t, cpu = now(), time.process_time()
    async with gpu_sampling(agent.config.resolved_device()) as gpu:
        reading = asyncio.create_task(_run_peers(url, n))
        while not reading.done():
            for pc_id, (lag, gaps) in (await _sessions(server)).items():
                lags.append(lag)
                underruns[pc_id] = gaps
            await asyncio.wait([reading], timeout=0.1)
        peers = reading.result()
    wall, cpu = now() - t, time.process_time() - cpu
    cpu_s_per_s = {"server": round(cpu / wall, 3)}
    if workers_cpu is not None:
        cpu_s_per_s["workers"] = round(workers_cpu() / wall, 3)
    for _ in range(100):  # the sessions close as their peers hang up: wait, so sizes do not overlap
        if not await _sessions(server):
            break
        await asyncio.sleep(0.1)
    v2v = [p["v2v_ear_s"] for p in peers["peers"] if p["v2v_ear_s"] is not None]
    base = concurrency_row(
        n, lags=lags, underruns=sum(underruns.values()), v2v=v2v, gpu=gpu,
        cpu_s_per_s={**cpu_s_per_s, **core(wall), "peers": round(peers["cpu_s"] / wall, 3)},
        wall=wall, **await probe())
    no_session = sum(not p["created"] for p in peers["peers"])
    unanswered = sum(p["created"] and not p["answered"] for p in peers["peers"])
    base["real_time"] = base["real_time"] and no_session == 0 and unanswered == 0
    return CapacityRow(**base, no_session=no_session, unanswered=unanswered, peer_processes=peers["processes"])


async def _bench(args: argparse.Namespace) -> dict[str, Any]:

    from duplex.agent import Agent
    from duplex.cli import config_from_args
    from duplex.e2e import SIZES, apply_bench_settings, max_sessions, sweep
    from duplex.transport.ice import allow_loopback_candidates
    from duplex.transport.server import Server, ServerOptions, Site

    allow_loopback_candidates()
    config = config_from_args(args)
    sizes = tuple(sorted(args.batch)) if getattr(args, "batch", None) else SIZES
    most = max(sizes) if getattr(args, "batch", None) else max_sessions(config, args.quick)
    if config.engine_slots is None:
        config.engine_slots = most  # engine rows for every session
    apply_bench_settings(config, quick=True)  # short fixed replies
    print(f"loading the {config.profile} profile ...", flush=True)
    workers = getattr(args, "workers", None)
    server: Site
    if workers:  # the sessions in worker processes around one engine core, as serve --workers runs them
        from duplex.transport.workers import Front

        front, core = await Front.start(config, ServerOptions(max_sessions=most), workers, loopback=True)
        agent, server = Agent(core.stages(), config, core), front  # this process's agent: the core's owner
    else:
        agent = await Agent.load(config)
        server = Server(agent, ServerOptions(max_sessions=most))
    try:
        async with server.on_loopback() as url:
            try:
                print(f"WebRTC peers (child processes of up to {PEERS_PER_PROCESS}) over loopback into the server "
                      f"at {url}:", flush=True)
                rows = await sweep(lambda n: measure(server, agent, url, n), most, sizes)
                best = max([r["sessions"] for r in rows if r["real_time"]], default=0)
                print(f"largest number of concurrent WebRTC sessions in real time: {best}")
                where = (f"{workers} worker processes and a front around one engine core" if workers
                         else "server and agent in one process")
                return {"concurrency": rows, "max_real_time_sessions": best, "workers": workers,
                        "note": f"{where}, the peers in another process, on this machine"}
            finally:
                await server.close()
    finally:
        await agent.aclose()


def run(args: argparse.Namespace) -> dict[str, Any]:
    """``duplex bench capacity``: prints each size's row and returns the figures."""
    return asyncio.run(_bench(args))


def main() -> None:
    parser = argparse.ArgumentParser(description="the peers' process of duplex bench capacity")
    parser.add_argument("role", choices=["peers"])
    parser.add_argument("url", help="the server's base URL")
    parser.add_argument("n", type=int, help="peers to run at once")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_peers(args.url, args.n))), flush=True)


if __name__ == "__main__":
    main()
