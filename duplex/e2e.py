"""``duplex bench e2e``: the whole pipeline over a scripted conversation, on the wall clock.

The script mixes real speech (JFK) and synthetic speech (espeak-ng), waits for each reply, and barges
in on one of them. Reported per turn: voice-to-voice latency (end of user speech to first agent audio)
and its breakdown (ASR final, end-of-turn wait, LLM first token, TTS first audio, first audio out),
and the barge-in latency (speech onset to agent audio silenced). Then the largest number of
concurrent sessions that keep real time (input never more than ``MAX_LAG_S`` behind and no gaps in
reply audio). Results go to ``<out>/e2e.json`` (by ``duplex bench``) and ``<out>/e2e.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

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


@dataclass
class Keeping:
    """How one session kept up: its worst input lag and the gaps inside reply audio."""

    max_lag_s: float = 0.0
    underruns: int = 0

    @property
    def real_time(self) -> bool:
        return self.max_lag_s <= MAX_LAG_S and self.underruns == 0


async def _run_monitored(agent: Agent, steps: list[Step]) -> tuple[ScenarioRun, Keeping]:
    session = agent.session()
    keeping = Keeping()

    async def monitor() -> None:
        while not session.closed:
            keeping.max_lag_s = max(keeping.max_lag_s, session.lag_s)
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
    max_lag_s: float
    underruns: int
    voice_to_voice_s: list[float]
    wall_s: float


async def concurrency(agent: Agent, steps: list[Step], max_sessions: int) -> list[ConcurrencyRow]:
    """Run 1, 2, 4, ... sessions at once until one of them falls out of real time."""
    rows: list[ConcurrencyRow] = []
    n = 1
    while n <= max_sessions:
        t = now()
        results = await asyncio.gather(*(_run_monitored(agent, steps) for _ in range(n)))
        worst = max(k.max_lag_s for _, k in results)
        underruns = sum(k.underruns for _, k in results)
        ok = all(k.real_time for _, k in results)
        v2v = [r.get("voice_to_voice_s") for run, _ in results for r in run.turn_metrics()]
        rows.append({"sessions": n, "real_time": ok, "max_lag_s": round(worst, 3), "underruns": underruns,
                     "voice_to_voice_s": [round(x, 3) for x in v2v if x is not None],
                     "wall_s": round(now() - t, 1)})
        print(f"  {n:3d} sessions: max input lag {worst:6.2f} s, reply-audio gaps {underruns:4d} -> "
              f"{'real time' if ok else 'NOT real time'}")
        if not ok:
            break
        n *= 2
    return rows


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
        best = max([r["sessions"] for r in rows if r["real_time"]], default=0)
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
    """The most concurrent sessions the benchmark tries: 4 on the CPU or with --quick, 64 on a GPU."""
    return 4 if quick or not config.resolved_device().startswith("cuda") else 64


def run(args: argparse.Namespace) -> dict[str, object]:
    return asyncio.run(_bench(args))
