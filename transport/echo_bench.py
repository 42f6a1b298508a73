"""``duplex bench echo``: the echo guard of ``duplex mic`` in simulated rooms, judged by the real
Silero VAD that decides barge-ins.

The agent's voice is JFK's speech, played through a room (:mod:`.room`) into the microphone. Each
candidate is measured twice: its canceller alone, and the canceller with the gate as ``duplex mic``
runs it (:class:`~.echo.EchoGuard`).

- Echo only (the agent talks, the user is silent), in six rooms: the plain room, a louder one, a
  speaker that clips, and three where the echo is not where the device's reported latency puts it
  (80 and 200 ms later, 10 ms earlier). Figures: the echo return loss enhancement of the canceller
  alone over seconds 0-1, 1-3 and 6-10 (dB; higher is better), and the speech starts the VAD hears
  after the guard (each one a self-interruption; none is the goal).
- Double talk: the agent talks 0-7 s, the user says "ask what you can do for your country" at 4 s,
  with the echo at two levels. Figures: the delay of the VAD's first speech start after 4 s, speech
  starts before 4 s (self-interruptions), and how much of the user's speech energy the guard keeps
  over their phrase (dB; 0 is all of it).
- Cost: milliseconds of CPU per 20 ms block.

:func:`compare` takes any candidates (``tools/echo-compare.py`` adds the hand-written canceller this
project used before, from git history, to the same table).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from duplex.audio import SAMPLE_SPEECH, read_audio
from duplex.transport.echo import BLOCK, Canceller, EchoGuard, WebRtcCanceller
from duplex.transport.room import room_echo

RATE = 16_000
USER_AT_S = 4.0


@dataclass
class Candidate:
    name: str
    canceller: Callable[[], Canceller]  # the canceller alone
    guard: Callable[[], Canceller]  # the canceller and the gate, as duplex mic runs it


def shipped() -> list[Candidate]:
    """What ``duplex mic`` runs: WebRTC's AEC3, with and without the gate."""
    return [Candidate("webrtc-aec3", WebRtcCanceller, EchoGuard)]


def _blocks(mic: np.ndarray, ref: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    n = (len(mic) // BLOCK) * BLOCK
    return np.concatenate([fn(mic[i:i + BLOCK], ref[i:i + BLOCK]) for i in range(0, n, BLOCK)])


def _db(a: np.ndarray, b: np.ndarray) -> float:
    num = float(np.mean(np.square(a, dtype=np.float64)))
    den = float(np.mean(np.square(b, dtype=np.float64)))
    return round(10 * float(np.log10(max(num, 1e-20) / max(den, 1e-20))), 1)


def _shift(ref: np.ndarray, ms: float) -> np.ndarray:
    """``ref`` moved ``ms`` later (earlier if negative), same length."""
    k = int(abs(ms) * RATE / 1000)
    pad = np.zeros(k, np.float32)
    return np.concatenate([pad, ref[:-k]]) if ms > 0 else np.concatenate([ref[k:], pad])


def rooms(speech: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Echo-only scenarios: name -> (microphone, the reference the guard is given)."""
    ref = speech[:11 * RATE]
    noise = np.random.default_rng(1).normal(0, 1e-3, len(ref)).astype(np.float32)
    echo = room_echo(ref, gain=0.7)
    return {
        "room": (echo + noise, ref),
        "loud room": (room_echo(ref, gain=1.0) + noise, ref),
        "clipping speaker": (0.5 * np.tanh(3 * echo) + noise, ref),
        "echo 80 ms late": (echo + noise, _shift(ref, -80)),
        "echo 200 ms late": (echo + noise, _shift(ref, -200)),
        "echo 10 ms early": (echo + noise, _shift(ref, 40)),  # the room's own 30 ms, then 40 ms off
    }


def double_talk(speech: np.ndarray, gain: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(microphone, reference, the user's speech alone): the agent 0-7 s, the user from 4 s."""
    ref = np.concatenate([speech[:7 * RATE], np.zeros(3 * RATE, np.float32)])
    user = np.zeros_like(ref)
    phrase = speech[int(8.19 * RATE):int(10.6 * RATE)]
    at = int(USER_AT_S * RATE)
    user[at:at + len(phrase)] = phrase
    return room_echo(ref, gain=gain) + user, ref, user


def _speech_starts(pcm: np.ndarray) -> list[float]:
    from duplex import events as ev
    from duplex.asr.vad import SileroVAD

    async def run() -> list[float]:
        stream = SileroVAD().new_stream()
        starts = []
        for i in range(0, len(pcm), BLOCK):
            for e in await stream.feed(pcm[i:i + BLOCK]):
                if isinstance(e, ev.SpeechStarted):
                    starts.append(round(e.start / RATE, 2))
        await stream.aclose()
        return starts

    return asyncio.run(run())


def compare(candidates: list[Candidate]) -> dict[str, dict[str, dict[str, object]]]:
    """Run every scenario for every candidate; print the tables; return the figures by candidate."""
    speech, _ = read_audio(SAMPLE_SPEECH, RATE)
    results: dict[str, dict[str, dict[str, object]]] = {c.name: {} for c in candidates}
    print("echo only: ERLE of the canceller alone (dB, s 0-1 / 1-3 / 6-10); speech starts the VAD hears "
          "(alone | with the gate); ms per 20 ms block")
    print(f"  {'candidate':20s} {'room':18s} {'ERLE':>18s}  {'starts alone':>14s} {'starts gated':>14s} {'ms':>6s}")
    for room, (mic, ref) in rooms(speech).items():
        for c in candidates:
            t = time.process_time()
            alone = _blocks(mic, ref, c.canceller().process)
            ms = 1000 * (time.process_time() - t) / (len(alone) / BLOCK)
            gated = _blocks(mic, ref, c.guard().process)
            m = mic[:len(alone)]
            erle = [_db(m[a * RATE:b * RATE], alone[a * RATE:b * RATE]) for a, b in ((0, 1), (1, 3), (6, 10))]
            starts_alone, starts_gated = _speech_starts(alone), _speech_starts(gated)
            results[c.name][room] = {"erle_db": erle, "starts_alone": starts_alone, "starts_gated": starts_gated,
                                     "ms_per_block": round(ms, 3)}
            print(f"  {c.name:20s} {room:18s} {' / '.join(f'{e:5.1f}' for e in erle):>18s}  "
                  f"{len(starts_alone):14d} {len(starts_gated):14d} {ms:6.2f}", flush=True)
    print(f"double talk (the user from {USER_AT_S:.0f} s): onset delay (s), self-interruptions before it, "
          "the user's speech kept (dB), with the gate")
    for gain in (0.5, 1.0):
        mic, ref, user = double_talk(speech, gain)
        span = slice(int(USER_AT_S * RATE), int(USER_AT_S * RATE) + int(2.41 * RATE))
        for c in candidates:
            out = _blocks(mic, ref, c.guard().process)
            starts = _speech_starts(out)
            later = [s for s in starts if s >= USER_AT_S - 0.1]
            onset = round(later[0] - USER_AT_S, 2) if later else None
            false_starts, kept = len(starts) - len(later), _db(out[span], user[span])
            results[c.name][f"double talk, echo gain {gain}"] = {"onset_delay_s": onset, "false_starts": false_starts,
                                                                "kept_db": kept}
            print(f"  {c.name:20s} echo gain {gain:<4}  onset {onset!s:>5} s  "
                  f"self-interruptions {false_starts}  kept {kept:5.1f} dB", flush=True)
    return results


def run(args: argparse.Namespace) -> dict[str, object]:
    return {"candidates": compare(shipped())}
