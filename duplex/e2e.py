"""``duplex bench e2e``: the whole pipeline over a scripted conversation, on the wall clock.

The script mixes real speech (JFK) and synthetic speech (espeak-ng), waits for each reply, and barges
in on one of them. Reported per turn: voice-to-voice latency (end of user speech to first agent audio)
and its breakdown (ASR final, end-of-turn wait, LLM first token, TTS first audio, first audio out),
and the barge-in latency (speech onset to agent audio silenced). Then a sweep of concurrent sessions
(1, 2, 4, 8, 16, 32, 48, 64, stopping after two sizes that fail): per size the input lag (p99, max),
reply-audio gaps, voice-to-voice p50/p99, each engine's tick time p50/p99, ticks a second and
sessions per tick, how busy the GPU was, CPU seconds per second and LLM listen prefills per
session-second; real time is input lag p99 <= 0.25 s and max <= 0.5 s with no gap. Results go to
``<out>/e2e.json`` (by ``duplex bench``; its ``concurrency`` rows and ``max_real_time_sessions``) and
``<out>/e2e.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, TypeVar

import numpy as np

from duplex.agent import Agent
from duplex.audio import SAMPLE_SPEECH, espeak, read_audio
from duplex.clock import now
from duplex.errors import AudioFormatError
from duplex.scenario import Say, ScenarioRun, Silence, Step, WaitDone, WaitSpeaking, run_scenario

log = logging.getLogger(__name__)

MAX_LAG_S = 0.5
BREAKDOWN = ("asr_final_s", "end_of_turn_s", "llm_first_token_s", "tts_first_audio_s", "playout_s")


def conversation_script(quick: bool = False) -> list[Step]:
    """Turns from real and synthetic speech; the second reply is interrupted."""
    jfk, _ = read_audio(SAMPLE_SPEECH, 16_000)
    fellow = jfk[int(0.2 * 16000):int(2.4 * 16000)]  # "And so my fellow Americans"
    ask = jfk[int(8.0 * 16000):int(10.8 * 16000)]  # "ask what you can do for your country"
    steps: list[Step] = [Say(fellow, label="jfk: and so my fellow Americans"), WaitSpeaking(), WaitDone()]
    if quick:
        return steps
    try:
        question = Say(espeak("What will the weather be like tomorrow in Paris?"), label="espeak: weather")
        thanks = Say(espeak("Thank you, that is all for today."), label="espeak: thanks")
    except AudioFormatError as exc:  # no espeak-ng on this machine: real speech only
        print(f"({exc}; using JFK's phrases only)")
        question = Say(jfk[int(5.25 * 16000):int(7.8 * 16000)], label="jfk: what your country can do for you")
        thanks = Say(jfk[int(3.15 * 16000):int(4.6 * 16000)], label="jfk: ask not")
    steps += [Silence(0.5), question, WaitSpeaking(), Silence(1.0),
              Say(ask, label="jfk barge-in: ask what you can do for your country"), WaitDone(),
              Silence(0.5), thanks, WaitSpeaking(), WaitDone()]
    return steps


BLOCK_S = 0.02  # sessions start spread over one 20 ms block, as real clients' packets arrive
SIZES = (1, 2, 4, 8, 16, 32, 48, 64)  # concurrent sessions the sweep tries, in order
LAG_P99_S = 0.25  # real time: input lag p99 at most this, max at most MAX_LAG_S, no reply-audio gap


@dataclass
class Keeping:
    """How one session kept up: its input lag, sampled every 0.1 s, and the gaps inside reply audio."""

    lags: list[float] = field(default_factory=list)
    underruns: int = 0

    @property
    def max_lag_s(self) -> float:
        return max(self.lags, default=0.0)


async def _run_monitored(agent: Agent, steps: list[Step], phase: float = 0.0) -> tuple[ScenarioRun, Keeping]:
    """Run ``steps`` in a new session, ``phase`` seconds late (sessions' 20 ms blocks, like real
    clients', do not arrive in step), sampling how it keeps up."""
    await asyncio.sleep(phase)
    session = agent.session()
    keeping = Keeping()

    async def monitor() -> None:
        while not session.closed:
            keeping.lags.append(session.lag_s)
            keeping.underruns = session.playout.underruns
            await asyncio.sleep(0.1)

    task = asyncio.create_task(monitor())
    try:
        run = await run_scenario(session, steps)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return run, keeping


class ConcurrencyRow(TypedDict):
    """One row of :func:`concurrency`: ``sessions`` run at once, and how they kept up."""

    sessions: int
    real_time: bool
    input_lag_p99_s: float
    input_lag_max_s: float
    underruns: int
    v2v_p50_s: float | None
    v2v_p99_s: float | None
    voice_to_voice_s: list[float]
    tick_ms_p50: dict[str, float]
    tick_ms_p99: dict[str, float]
    ticks_per_s: dict[str, float]  # step ticks (a tick with rows) a second, by engine
    rows_per_tick: dict[str, float]  # sessions in such a tick on average, by engine
    gpu_busy: float | None
    cpu_s_per_s: dict[str, float]
    listen_prefills_per_session_s: float | None
    wire_messages_per_write: dict[str, float] | None  # engine core process: each side's messages per socket write
    wire_messages_per_session_s: dict[str, float] | None  # and the messages each side sent, per session-second
    asr_decoded_again: float | None  # share of the ASR's captured steady steps decoded again (None: none captured)
    wall_s: float


def _quantile(values: list[float], q: float) -> float | None:
    return round(float(np.quantile(values, q)), 4) if values else None


def _schedulers(stages: Any) -> dict[str, Any]:
    """Each model's engine scheduler (the fake profile's stages have none)."""
    found = {}
    for role in ("vad", "asr", "llm", "tts"):
        model = getattr(stages, role)
        scheduler = getattr(model, "scheduler", None) or getattr(model, "worker", None)
        if scheduler is not None and hasattr(scheduler, "ticks_since"):
            found[role] = scheduler
    return found


async def _gpu_busy(samples: list[float], device: str) -> None:
    """Sample the GPU's utilisation (NVML) every 0.1 s into ``samples`` until cancelled."""
    import torch

    while True:
        try:
            samples.append(torch.cuda.utilization(torch.device(device)) / 100.0)
        except Exception:  # no NVML here: no figure
            return
        await asyncio.sleep(0.1)


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) process ``pid`` has used so far; None where /proc cannot tell."""
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def core_cpu(agent: Agent) -> Callable[[float], dict[str, float]]:
    """Start counting the engine core process's CPU (none in one process); the returned function gives
    ``{"core": seconds per second}`` over ``wall`` seconds since."""
    pid = int(agent.core.info["pid"]) if agent.core is not None else None
    start = process_cpu_s(pid) if pid is not None else None

    def since(wall: float) -> dict[str, float]:
        end = process_cpu_s(pid) if pid is not None else None
        return {} if start is None or end is None else {"core": round((end - start) / wall, 3)}

    return since


def concurrency_row(n: int, *, lags: list[float], underruns: int, v2v: list[float], ticks: dict[str, list[float]],
                    rows: dict[str, list[int]], gpu: list[float], cpu_s_per_s: dict[str, float],
                    listens: int | None, wall: float,
                    wire: dict[str, float] | None = None, messages: dict[str, int] | None = None,
                    asr_steps: tuple[int, int] | None = None) -> ConcurrencyRow:
    """One size of a concurrency sweep from what was sampled while ``n`` sessions ran for ``wall``
    seconds: input lags (every 0.1 s), reply-audio gaps, voice-to-voice latencies, each engine's tick
    times (ms) and rows stepped per tick, GPU utilisation samples, CPU seconds per second by process,
    LLM listen prefills, the ASR's captured steady steps and those of them decoded again (``asr_steps``)
    and, across an engine core's socket, each side's messages per write and the messages it sent."""
    p99, worst = _quantile(lags, 0.99) or 0.0, max(lags, default=0.0)
    stepped = {role: [r for r in counts if r] for role, counts in rows.items()}
    return {
        "sessions": n, "real_time": p99 <= LAG_P99_S and worst <= MAX_LAG_S and underruns == 0,
        "input_lag_p99_s": round(p99, 3), "input_lag_max_s": round(worst, 3),
        "underruns": underruns, "v2v_p50_s": _quantile(v2v, 0.5), "v2v_p99_s": _quantile(v2v, 0.99),
        "voice_to_voice_s": [round(x, 3) for x in v2v],
        "tick_ms_p50": {role: q for role, v in ticks.items() if (q := _quantile(v, 0.5)) is not None},
        "tick_ms_p99": {role: q for role, v in ticks.items() if (q := _quantile(v, 0.99)) is not None},
        "ticks_per_s": {role: round(len(v) / wall, 1) for role, v in stepped.items()},
        "rows_per_tick": {role: round(sum(v) / len(v), 2) for role, v in stepped.items() if v},
        "gpu_busy": round(sum(gpu) / len(gpu), 3) if gpu else None, "cpu_s_per_s": cpu_s_per_s,
        "listen_prefills_per_session_s": None if listens is None else round(listens / n / wall, 2),
        "wire_messages_per_write": wire,
        "wire_messages_per_session_s": None if messages is None else
        {side: round(m / n / wall, 1) for side, m in messages.items()},
        "asr_decoded_again": round(asr_steps[1] / asr_steps[0], 3) if asr_steps and asr_steps[0] else None,
        "wall_s": round(wall, 1)}


def print_row(row: ConcurrencyRow) -> None:
    cpu = ", ".join(f"{name} {value:.2f}" for name, value in row["cpu_s_per_s"].items())
    ticks = " ".join(f"{role} {rate:.0f} ({row['rows_per_tick'].get(role, 0):.1f})"
                     for role, rate in row["ticks_per_s"].items())
    print(f"  {row['sessions']:3d} sessions: input lag p99 {row['input_lag_p99_s']:5.2f} s, max "
          f"{row['input_lag_max_s']:5.2f} s, reply-audio gaps {row['underruns']:4d}, v2v p50 {row['v2v_p50_s']} s, "
          f"CPU s/s {cpu}, ticks/s (rows) {ticks}"
          + (f", GPU busy {row['gpu_busy']:.0%}" if row["gpu_busy"] is not None else "")
          + f", listens {row['listen_prefills_per_session_s']}/session/s"
          + (f", wire messages/session/s {row['wire_messages_per_session_s']}" if row["wire_messages_per_session_s"] else "")
          + (f", ASR steps decoded again {row['asr_decoded_again']:.1%}" if row["asr_decoded_again"] is not None else "")
          + " -> "
          f"{'real time' if row['real_time'] else 'NOT real time'}", flush=True)


Row = TypeVar("Row", bound=ConcurrencyRow)


async def sweep(measure: Callable[[int], Awaitable[Row]], max_sessions: int,
                sizes: tuple[int, ...] = SIZES) -> list[Row]:
    """``measure`` 1, 2, 4, 8, ... sessions at once (up to ``max_sessions``), printing each row, until
    two sizes in a row fall out of real time (input lag p99 over LAG_P99_S or max over MAX_LAG_S, or a
    gap in reply audio)."""
    rows: list[Row] = []
    failed = 0
    for n in (size for size in sizes if size <= max_sessions):
        rows.append(await measure(n))
        print_row(rows[-1])
        failed = 0 if rows[-1]["real_time"] else failed + 1
        if failed == 2:
            break
    return rows


def engine_ticks(stages: Any, since: dict[str, int] | None = None) -> dict[str, Any]:
    """Each engine's tick count now (``counts``), the times (ms) and rows stepped of the ticks run
    since the counts in ``since`` (``ticks``, ``rows``, by engine) and the LLM's listen count
    (``listens``, None without a counter), and the ASR's captured steady steps and those of them
    decoded again (``asr_steps``, counts so far). The engine core process answers the same for its
    stages, with its side of the socket's message and write counts (``wire``)."""
    schedulers = _schedulers(stages)
    ran = {role: s.ticks_since(since[role]) for role, s in schedulers.items() if since is not None and role in since}
    return {"counts": {role: s.ticks for role, s in schedulers.items()},
            "ticks": {role: [1e3 * tick.seconds for tick in ticks] for role, ticks in ran.items()},
            "rows": {role: [tick.rows for tick in ticks] for role, ticks in ran.items()},
            "listens": getattr(stages.llm, "listens", None),
            "asr_steps": (getattr(stages.asr, "steady_steps", 0), getattr(stages.asr, "redecoded", 0))}


def per_write(start: dict[str, int], end: dict[str, int]) -> float:
    """Messages per socket write between two copies of :data:`duplex.core.wire.TOTALS`."""
    return round((end["messages"] - start["messages"]) / max(end["writes"] - start["writes"], 1), 2)


async def engine_probe(agent: Agent, workers: bool = False) -> Callable[[], Awaitable[dict[str, Any]]]:
    """Start counting each engine's ticks and the LLM's listens now, in this process or in the agent's
    engine core; the returned function gives what happened since: ``ticks`` (ms per tick, by engine),
    ``rows`` (rows stepped per tick, by engine), ``listens`` (None without a listen counter) and, with
    an engine core, ``wire``: messages per socket write of the core (to all its frontends) and, when
    the sessions run in this process (not in ``workers`` processes), of this side, and ``messages``:
    the messages each of them sent."""
    async def read(since: dict[str, int] | None) -> dict[str, Any]:
        if agent.core is not None:
            from duplex.core import wire

            return {**await agent.core.engine_ticks(since), "frontend": wire.TOTALS.copy()}
        return engine_ticks(agent.stages, since)

    start = await read(None)

    async def since() -> dict[str, Any]:
        end = await read(start["counts"])
        listens0, listens = start["listens"], end["listens"]
        wire = messages = None
        if "wire" in end:
            sides = ["core"] if workers else ["core", "frontend"]  # (this process's sessions: the core's only frontend)
            totals = {"core": (start["wire"], end["wire"]), "frontend": (start["frontend"], end["frontend"])}
            wire = {side: per_write(*totals[side]) for side in sides}
            messages = {side: totals[side][1]["messages"] - totals[side][0]["messages"] for side in sides}
        (steps0, again0), (steps, again) = start["asr_steps"], end["asr_steps"]
        return {"ticks": end["ticks"], "rows": end["rows"],
                "listens": None if listens is None or listens0 is None else listens - listens0, "wire": wire,
                "messages": messages, "asr_steps": (steps - steps0, again - again0)}

    return since


@contextlib.asynccontextmanager
async def gpu_sampling(device: str) -> AsyncIterator[list[float]]:
    """GPU utilisation samples (every 0.1 s) while the block runs; none off CUDA."""
    samples: list[float] = []
    sampler = asyncio.create_task(_gpu_busy(samples, device)) if device.startswith("cuda") else None
    try:
        yield samples
    finally:
        if sampler is not None:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)


async def concurrency(agent: Agent, steps: list[Step], max_sessions: int,
                      sizes: tuple[int, ...] = SIZES) -> list[ConcurrencyRow]:
    """The sweep of :func:`sweep` over sessions of this agent, each running ``steps``."""
    async def measure(n: int) -> ConcurrencyRow:
        probe, core = await engine_probe(agent), core_cpu(agent)
        t, cpu = now(), time.process_time()
        async with gpu_sampling(agent.config.resolved_device()) as gpu:
            results = await asyncio.gather(*(_run_monitored(agent, steps, BLOCK_S * i / n) for i in range(n)))
        wall, cpu = now() - t, time.process_time() - cpu
        return concurrency_row(
            n, lags=[lag for _, k in results for lag in k.lags], underruns=sum(k.underruns for _, k in results),
            v2v=[x for run, _ in results for r in run.turn_metrics() if (x := r.get("voice_to_voice_s")) is not None],
            gpu=gpu, cpu_s_per_s={"agent": round(cpu / wall, 3), **core(wall)},  # the agent (+ its core)
            wall=wall, **await probe())

    return await sweep(measure, max_sessions, sizes)


def plot(turns: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"turn {i + 1}" for i in range(len(turns))]
    bottom = np.zeros(len(turns))
    parts = [p for p in BREAKDOWN if p != "asr_final_s"]  # asr_final overlaps the end-of-turn wait
    for part in parts:
        values = np.array([t.get(part, 0.0) for t in turns])
        ax.bar(labels, values, bottom=bottom, label=part.removesuffix("_s").replace("_", " "))
        bottom += values
    for i, t in enumerate(turns):
        ax.text(i, bottom[i], f"{t.get('voice_to_voice_s', 0):.2f} s", ha="center", va="bottom")
    ax.set_ylabel("seconds from end of user speech")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def _bench(args: argparse.Namespace) -> dict[str, object]:
    from duplex.cli import config_from_args

    config = config_from_args(args)
    apply_bench_settings(config, quick=args.quick)
    print(f"loading the {config.profile} profile ...", flush=True)
    agent = await Agent.load(config)
    try:
        steps = conversation_script(quick=args.quick)
        print("scripted conversation:", ", ".join(s.label for s in steps if isinstance(s, Say)))
        run, keeping = await _run_monitored(agent, steps)
        turns = run.turn_metrics()
        print("reply  voice-to-voice  " + "  ".join(f"{p[:-2]:>16}" for p in BREAKDOWN))
        for t in turns:
            print(f"{int(t['reply_id']):5d}  {t.get('voice_to_voice_s', float('nan')):14.3f}  "
                  + "  ".join(f"{t.get(p, float('nan')):16.3f}" for p in BREAKDOWN))
        barge = run.barge_ins()
        for b in barge:
            print(f"barge-in: agent audio silenced {1000 * b:.0f} ms after the user's speech onset")
        if run.timeouts:
            print(f"timeouts: {run.timeouts}")
        print(f"single session: max input lag {keeping.max_lag_s:.2f} s, reply-audio gaps {keeping.underruns}")
        out = Path(args.out)
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(plot, turns, out / "e2e.png",
                                f"duplex voice-to-voice latency ({config.profile}, {config.resolved_device()})")
        print(f"(plot: {out / 'e2e.png'})")
        print("concurrent sessions:")
        short = conversation_script(quick=True)
        rows = await concurrency(agent, short, max_sessions=max_sessions(config, args.quick))
        best = max([r["sessions"] for r in rows if r["real_time"]], default=0)  # the largest that kept up
        print(f"largest number of concurrent sessions in real time: {best}")
        return {"turns": turns, "barge_in_s": barge, "timeouts": run.timeouts,
                "single_session": {"max_lag_s": keeping.max_lag_s, "underruns": keeping.underruns},
                "concurrency": rows, "max_real_time_sessions": best,
                "conversation": run.conversation}
    finally:
        await agent.aclose()


def apply_bench_settings(config, quick: bool) -> None:
    """Fixed, short replies so figures do not depend on when random weights stop generating, and
    engine rows for every session the concurrency test may open."""
    config.max_reply_tokens = 12 if quick else 24
    config.fixed_lengths = True
    if config.engine_slots is None:
        config.engine_slots = max_sessions(config, quick)


def max_sessions(config, quick: bool) -> int:
    """The most concurrent sessions the benchmark tries. With models: 8 on the CPU, 4 on a GPU with
    --quick, else 64. The fake profile's models cost nothing, so its sweep measures the plumbing
    (sessions, frontends, the engine core's wire) on any machine: 64, 8 with --quick."""
    if config.profile == "fake":
        return 8 if quick else 64
    if not config.resolved_device().startswith("cuda"):
        return 8
    return 4 if quick else 64


def run(args: argparse.Namespace) -> dict[str, object]:
    return asyncio.run(_bench(args))
