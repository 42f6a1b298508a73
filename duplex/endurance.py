"""``duplex bench endurance``: a long dialogue, watched minute by minute.

One session talks for ``--minutes`` minutes (turns cut from JFK's speech, one reply in four
interrupted), on the virtual clock by default or on the wall clock with ``--realtime`` (the tiny
profile keeps up on a CPU: an hour takes an hour). Every minute it samples the process memory
(RSS), the LLM's KV-cache size, the voice-to-voice latency of the turns in that minute, what one
ASR partial cost in that minute (CPU milliseconds of the event loop for its events, the turn policy
and the record's messages; and milliseconds of the LLM's listen job that prefills the new words),
and the real seconds the minute took; it prints the series and a first-vs-last summary. Flat series
are the point: the attention-sink cache, the record and the streaming ASR/TTS states must not grow
with the dialogue.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from dataclasses import asdict, dataclass

import numpy as np

from duplex import events as ev
from duplex.agent import Agent
from duplex.audio import SAMPLE_SPEECH, read_audio
from duplex.clock import run_virtual
from duplex.scenario import Say, Silence, Step, WaitDone, WaitSpeaking, run_scenario

PHRASES = [(0.2, 2.4), (3.15, 4.6), (5.25, 7.8), (8.0, 10.8)]


@dataclass
class Sample:
    minute: int
    rss_mb: float
    llm_cache_tokens: int | None
    llm_cache_mb: float | None
    turns: int
    voice_to_voice_s: float | None  # mean over this minute's replies
    partials: int  # ASR partials this minute
    partial_ms: float | None  # event-loop CPU ms per partial (events, policy, the record's messages)
    listen_ms: float | None  # ms per LLM listen job (prefill of the new words), on the LLM's worker
    compute_s: float  # real seconds this minute took


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def dialogue(minutes: float) -> list[Step]:
    """More than enough turns to fill ``minutes`` (the run stops on time): each phrase, a reply,
    every fourth reply interrupted."""
    jfk, _ = read_audio(SAMPLE_SPEECH, 16_000)
    clips = [jfk[int(a * 16000):int(b * 16000)] for a, b in PHRASES]
    steps: list[Step] = []
    seconds = 0.0
    for k in itertools.count():
        if seconds >= minutes * 60:
            return steps
        speech = clips[k % len(clips)]
        steps += [Say(speech), WaitSpeaking(timeout_s=20)]
        if k % 4 == 3:
            steps += [Silence(0.8), Say(clips[(k + 1) % len(clips)])]
        steps += [WaitDone(timeout_s=60), Silence(1.0)]
        seconds += len(speech) / 16000 + 4.0  # a turn takes longer than this: the script runs over
    return steps


async def endurance(agent: Agent, minutes: float, every_s: float = 60.0) -> list[Sample]:
    session = agent.session()
    samples: list[Sample] = []
    window: list[float] = []
    turns = 0

    def on_event(e: ev.Event) -> None:
        nonlocal turns
        if isinstance(e, ev.Metric) and e.name == "voice_to_voice_s":
            window.append(e.value)
        elif isinstance(e, ev.TurnEnded):
            turns += 1

    async def sampler() -> None:
        minute, last = 0, time.perf_counter()
        seen = (0, 0.0, 0, 0.0)  # partials, their CPU s, listens, their s: totals at the last sample
        while not session.closed:
            await asyncio.sleep(every_s)
            minute += 1
            cache = session.stage_stats().get("llm") or {}
            totals = (session.listening.partials, session.listening.partial_cpu_s, int(cache.get("listens", 0)),
                      float(cache.get("listen_s", 0.0)))
            partials, partial_s, listens, listen_s = (a - b for a, b in zip(totals, seen))
            seen = totals
            samples.append(Sample(
                minute=minute, rss_mb=round(rss_mb(), 1),
                llm_cache_tokens=int(cache["cache_tokens"]) if "cache_tokens" in cache else None,
                llm_cache_mb=round(cache["cache_bytes"] / 2**20, 2) if "cache_bytes" in cache else None,
                turns=turns, voice_to_voice_s=round(float(np.mean(window)), 3) if window else None,
                partials=int(partials),
                partial_ms=round(1000 * partial_s / partials, 3) if partials else None,
                listen_ms=round(1000 * listen_s / listens, 2) if listens else None,
                compute_s=round(time.perf_counter() - last, 2)))
            window.clear()
            last = time.perf_counter()
            s = samples[-1]
            print(f"{s.minute:6d} {s.rss_mb:9.1f} {s.llm_cache_tokens!s:>12} {s.llm_cache_mb!s:>9} "
                  f"{s.turns:6d} {s.voice_to_voice_s!s:>10} {s.partials:8d} {s.partial_ms!s:>10} "
                  f"{s.listen_ms!s:>9} {s.compute_s:9.2f}", flush=True)

    print(" minute   rss_mb  cache_tokens  cache_mb  turns  v2v_mean  partials  partial_ms  listen_ms  compute_s")
    tasks = [asyncio.create_task(sampler()),
             asyncio.create_task(run_scenario(session, dialogue(minutes), keep_events=False, keep_audio=False,
                                              on_event=on_event))]
    try:
        await asyncio.wait([tasks[1]], timeout=minutes * 60 + 1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # the scenario closes the session
    return samples


def summarize(samples: list[Sample]) -> dict[str, object]:
    if len(samples) < 4:
        return {"samples": [asdict(s) for s in samples]}
    head, tail = samples[1:3], samples[-2:]  # skip minute 1 (warm-up)

    def mean(rows: list[Sample], key: str) -> float | None:
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        return round(float(np.mean(values)), 3) if values else None

    summary = {key: {"first": mean(head, key), "last": mean(tail, key)}
               for key in ("rss_mb", "llm_cache_tokens", "llm_cache_mb", "voice_to_voice_s", "partial_ms",
                           "listen_ms", "compute_s")}
    print("first minutes vs last minutes:")
    for key, v in summary.items():
        print(f"  {key:18s} {v['first']!s:>10} -> {v['last']!s:>10}")
    return {"summary": summary, "samples": [asdict(s) for s in samples]}


def run(args: argparse.Namespace) -> dict[str, object]:
    from duplex.cli import config_from_args

    config = config_from_args(args)

    async def main() -> dict[str, object]:
        agent = await Agent.load(config)
        try:
            return summarize(await endurance(agent, args.minutes))
        finally:
            await agent.aclose()

    realtime = getattr(args, "realtime", False)
    clock = "wall clock" if realtime else "virtual clock"
    print(f"endurance: {args.minutes} minutes, profile {config.profile}, {clock}", flush=True)
    result = asyncio.run(main()) if realtime else run_virtual(main())
    return {"clock": "wall" if realtime else "virtual", **result}
