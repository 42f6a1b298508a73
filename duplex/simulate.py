"""``duplex simulate``: a whole conversation from an audio file, as if spoken live.

The file is pushed in 20 ms packets at the pace a microphone would deliver them (then ``tail``
seconds of silence, and more until the agent has finished speaking) by :mod:`duplex.scenario`, on
the wall clock with ``--realtime`` or else on a virtual clock (:func:`duplex.clock.run_virtual`:
model compute costs no time, so the figures are the pipeline's algorithmic latencies and repeat
exactly). Writes to the output folder:

- ``agent.wav``: what the agent said, time-aligned to the input (sample 0 = the file's start);
- ``timeline.jsonl``: every event, one JSON object per line, with ``t`` = seconds since the start;
- ``conversation.json``: the conversation record (user turns, agent words heard, interruptions);

and returns (and prints) the per-turn latency breakdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from duplex import events as ev
from duplex.agent import Agent
from duplex.audio import read_audio, write_wav
from duplex.clock import run_virtual
from duplex.config import AgentConfig
from duplex.events import to_json
from duplex.scenario import Say, Silence, WaitDone, run_scenario


@dataclass
class SimulationResult:
    out_dir: Path
    turns: list[dict[str, float]] = field(default_factory=list)  # per reply: latency breakdown
    barge_ins: list[float] = field(default_factory=list)
    events: int = 0
    conversation: dict = field(default_factory=dict)


async def simulate(agent: Agent, pcm: np.ndarray, sample_rate: int, out_dir: Path, *,
                   tail_s: float = 4.0, max_wait_s: float = 60.0) -> SimulationResult:
    """Run one session over ``pcm`` with ``agent`` (in the running loop) and write the outputs.

    After the file and ``tail_s`` of silence, silence goes on (at most ``max_wait_s``) until the
    agent has finished speaking."""
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    result = SimulationResult(out_dir)
    session = agent.session()
    rows: list[str] = []  # the timeline, written at the end (no file I/O on the loop while it runs)

    def write(event: ev.Event) -> None:
        row = to_json(event)
        row["t"] = round(event.wall - session.t0, 4)
        rows.append(json.dumps(row) + "\n")
        result.events += 1

    run = await run_scenario(session, [Say(pcm, sample_rate), Silence(tail_s), WaitDone(max_wait_s)],
                             keep_events=False, on_event=write)
    out = run.audio()
    n_out = int(round(run.pushed_s * session.output_rate))
    out = np.concatenate([out, np.zeros(max(0, n_out - len(out)), np.float32)])[:n_out]
    result.conversation = run.conversation

    def save() -> None:
        (out_dir / "timeline.jsonl").write_text("".join(rows))
        write_wav(out_dir / "agent.wav", out, session.output_rate)
        (out_dir / "conversation.json").write_text(json.dumps(result.conversation, indent=2))

    await asyncio.to_thread(save)
    result.turns, result.barge_ins = run.turn_metrics(), run.barge_ins()
    return result


def format_turns(result: SimulationResult) -> str:
    cols = ["voice_to_voice_s", "asr_final_s", "end_of_turn_s", "llm_first_token_s", "tts_first_audio_s",
            "playout_s"]
    lines = ["reply  " + "  ".join(f"{c[:-2]:>17}" for c in cols)]
    for row in result.turns:
        lines.append(f"{int(row['reply_id']):5d}  " + "  ".join(
            f"{row[c]:17.3f}" if c in row else f"{'-':>17}" for c in cols))
    if not result.turns:
        lines.append("(the agent did not speak)")
    for b in result.barge_ins:
        lines.append(f"barge-in: audio silenced {b * 1000:.0f} ms after the user's speech onset")
    return "\n".join(lines)


async def run_simulation(config: AgentConfig, input_path: str | Path, out_dir: str | Path, *,
                         tail_s: float = 4.0) -> SimulationResult:
    pcm, rate = read_audio(input_path)
    agent = await Agent.load(config)
    try:
        return await simulate(agent, pcm, rate, Path(out_dir), tail_s=tail_s)
    finally:
        await agent.aclose()


def main(args: argparse.Namespace) -> int:
    from duplex.cli import config_from_args

    config = config_from_args(args)
    read_audio(args.input)  # fail fast, before loading models, on a missing or unreadable file
    started = time.perf_counter()
    coro = run_simulation(config, args.input, args.out, tail_s=args.tail)
    result = asyncio.run(coro) if args.realtime else run_virtual(coro)
    clock = "wall clock" if args.realtime else "virtual clock (model compute not counted)"
    print(f"simulated {args.input} with profile {config.profile} on the {clock} "
          f"in {time.perf_counter() - started:.1f} s; {result.events} events")
    print(format_turns(result))
    for t in result.conversation["turns"]:
        who = "user " if t["role"] == "user" else "agent"
        text = t["text"] if t["role"] == "user" else t["heard"] + (" [interrupted]" if t["interrupted"] else "")
        print(f"  {who}: {text}")
    print(f"wrote {Path(args.out) / 'agent.wav'}, timeline.jsonl, conversation.json")
    return 0
