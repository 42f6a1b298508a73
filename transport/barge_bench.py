"""Barge-in at the ear: from the user's speech onset to the agent's last audible sample at a client.

The server's own ``barge_in_s`` stops at its decision; a person hears the agent until the audio
already on its way has played out. Here a real aiortc peer (:mod:`.client`) talks to ``duplex serve``
(``fake`` models) over loopback: it says a phrase, waits until it hears the agent's reply, and after
``--lead`` seconds of it speaks again over the agent without muting anything itself (a phone app, a
SIP bridge, another SDK: a *plain* client). Its microphone is real time: a 20 ms frame leaves when its
last sample has been captured. Its receiver holds ``--client-prefetch`` frames in its jitter buffer
before playing (aiortc's default is 4; 2, 40 ms, is what a browser's settles to on a clean network).

Per run, on the one loop clock both ends share:

- ``ear_ms``: the onset (the second phrase's first 2 ms above -34 dBFS that 10 ms of it follow) to the last sample of
  the agent's audio played at the client above -40 dBFS (a frame plays from when the jitter buffer
  hands it out);
- ``server_ms``: the server's own ``barge_in_s`` for the same barge-in;
- ``clicks``: sample-to-sample jumps the agent's beeps cannot make (> 0.1 full scale) anywhere in what
  the client played (a frame lost to a stalled machine makes one), ``cut_clicks`` those at the cut; ``underruns``: frames of silence inside the reply because its
  audio came late (the server's count) and frames the outbound queue dropped.

The onset's place inside the VAD's 32 ms window decides how soon the window scores it as speech
(20-60 ms), so run *i* of *n* starts the second phrase ``32 * i / n`` ms later within its frame
(``lead_ms`` in each row): the runs sample that phase evenly instead of repeating one by chance.

Run: ``duplex bench barge-in --profile fake`` (best and median of ``--runs``, default 3).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import statistics

import numpy as np

from duplex import events as ev
from duplex.agent import Agent
from duplex.audio import SAMPLE_SPEECH, read_audio, to_int16
from duplex.config import AgentConfig

RATE = 48_000
FRAME = RATE // 50
FAKE = {"llm": {"eot": 0.9, "ttft_s": 0.1, "token_s": 0.02,
                "replies": ["one two three four five six seven eight nine ten eleven twelve."]},
        "tts": {"word_s": 0.25, "first_chunk_s": 0.05}}
ONSET_RMS = 0.02  # -34 dBFS over 2 ms blocks, for 10 ms: the user's speech has begun
AUDIBLE_RMS = 0.01  # -40 dBFS over 1 ms: the agent can still be heard
CLICK = 0.1  # a 0.3-amplitude beep below 700 Hz moves at most 0.03 per sample at 48 kHz


VAD_WINDOW_S = 0.032  # the onset phases the runs spread over


def _phrases() -> tuple[np.ndarray, np.ndarray]:
    """The user's two phrases at the bench's rate: JFK's first words, and later ones said over the agent."""
    pcm, _ = read_audio(SAMPLE_SPEECH, RATE)
    return pcm[int(0.2 * RATE):int(2.4 * RATE)], pcm[int(5.3 * RATE):int(7.8 * RATE)]


def _delayed(second: np.ndarray, run: int, runs: int) -> tuple[np.ndarray, float]:
    """``second`` started later by run ``run``'s share of one VAD window, and that delay (ms)."""
    delay = VAD_WINDOW_S * run / runs
    return np.concatenate([np.zeros(int(round(delay * RATE)), np.float32), second]), round(1000 * delay, 1)


def _onset(pcm: np.ndarray, rms: float, block: int, hold: int = 5) -> int:
    """The first sample of the first ``block`` above ``rms`` that ``hold - 1`` more follow (10 ms of
    2 ms blocks): speech, not one block of a recording's noise floor crossing the threshold (JFK's
    hiss peaks at -35 dBFS, and one such block, 90 ms before the word, was taken for its onset
    whenever the phrase's alignment favoured it); -1 if none."""
    n = len(pcm) // block
    above = np.sqrt(np.mean(pcm[:n * block].reshape(n, block) ** 2, axis=1)) > rms
    runs = np.convolve(above.astype(int), np.ones(hold, int), "valid") == hold
    hits = np.flatnonzero(runs)
    return int(hits[0]) * block if len(hits) else -1


def _last_above(pcm: np.ndarray, rms: float, block: int) -> int:
    """The end (exclusive) of the last ``block`` whose RMS is above ``rms``; 0 if none."""
    n = len(pcm) // block
    levels = np.sqrt(np.mean(pcm[:n * block].reshape(n, block) ** 2, axis=1))
    hits = np.flatnonzero(levels > rms)
    return (int(hits[-1]) + 1) * block if len(hits) else 0


def _clicks(walls: list[float], frames: list[np.ndarray], ear: float | None) -> tuple[int, int]:
    """Clicks in what was played, and those within 50 ms of the cut (``ear``): a stall of a loaded
    machine elsewhere in the reply is not the cut's doing."""
    audio = np.concatenate(frames)
    times = np.concatenate([w + np.arange(len(f)) / RATE for w, f in zip(walls, frames)])
    jumps = np.abs(np.diff(audio)) > CLICK
    at_cut = jumps & (np.abs(times[1:] - ear) < 0.05) if ear is not None else jumps & False
    return int(jumps.sum()), int(at_cut.sum())


def talker(first: np.ndarray, second: np.ndarray):
    """A microphone that says ``first``, then silence until :meth:`go`, then ``second`` from the next
    frame on, then silence. Frames leave in real time, each when its last sample is captured."""
    import av
    from aiortc.mediastreams import MediaStreamTrack

    class Talker(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.start: float | None = None
            self.sent = 0  # frames sent
            self.queue = list(np.array_split(first[:len(first) // FRAME * FRAME], len(first) // FRAME))
            self.onset_wall: float | None = None  # when the onset of `second` was spoken

        def go(self) -> None:
            offset = _onset(second, ONSET_RMS, 96)
            self.queue = list(np.array_split(second[:len(second) // FRAME * FRAME], len(second) // FRAME))
            # the second phrase's first frame is the next one: it starts being captured at `sent`
            assert self.start is not None, "go() before the first frame was sent"
            self.onset_wall = self.start + (self.sent + max(0, offset) / FRAME) * 0.02

        async def recv(self):
            loop = asyncio.get_running_loop()
            if self.start is None:
                self.start = loop.time()
            await asyncio.sleep(max(0.0, self.start + (self.sent + 1) * 0.02 - loop.time()))
            block = self.queue.pop(0) if self.queue else np.zeros(FRAME, np.float32)
            stereo = np.repeat(to_int16(block)[:, None], 2, axis=1).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
            frame.sample_rate, frame.pts, frame.time_base = RATE, self.sent * FRAME, fractions.Fraction(1, RATE)
            self.sent += 1
            return frame

    return Talker()


async def _one(url: str, server, prefetch: int, lead_s: float, first: np.ndarray, second: np.ndarray) -> dict:
    from duplex.transport.client import connect

    mic = talker(first, second)
    client = await connect(url, mic, prefetch=prefetch)
    try:
        await client.wait_for("session.created", timeout=20)
        peer = server.peers[client.pc_id]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while loop.time() < deadline:  # the client hears the reply begin
            if any(np.abs(f).max() > 0.05 for f in client.frames[-3:]):
                break
            await asyncio.sleep(0.01)
        else:
            raise RuntimeError("the agent's reply never reached the client")
        await asyncio.sleep(lead_s)
        mic.go()
        await client.wait_for("agent.interrupted", timeout=10)
        await asyncio.sleep(0.5)
        assert mic.onset_wall is not None
        # what the client played: frame i plays from frame_walls[i] for 20 ms
        walls, frames = list(client.frame_walls), list(client.frames)
        ear = max((w + _last_above(f, AUDIBLE_RMS, 48) / RATE for w, f in zip(walls, frames)
                   if w + 0.02 >= mic.onset_wall and _last_above(f, AUDIBLE_RMS, 48)), default=None)
        clicks, cut_clicks = _clicks(walls, frames, ear)
        metric = next((m for m in client.of("agent.metric") if m.get("name") == "barge_in_s"), None)
        server_s = None if metric is None else float(metric["value"])
        paused = None if metric is None else peer.session.t0 + metric["t"]  # the first frame the pause silenced
        return {"ear_ms": None if ear is None else round(1000 * (ear - mic.onset_wall), 1),
                "server_ms": None if server_s is None else round(1000 * server_s, 1),
                # where the rest goes: the onset's way in (to the VAD window it starts), the cut's way out
                "in_ms": None if paused is None or server_s is None
                else round(1000 * (paused - server_s - mic.onset_wall), 1),
                "out_ms": None if ear is None or paused is None else round(1000 * (ear - paused), 1),
                "clicks": clicks, "cut_clicks": cut_clicks,
                "underruns": peer.session.playout.underruns, "dropped": peer.track.dropped,
                "queued_ms": round(1000 * peer.track.buffered_s(), 1)}
    finally:
        with contextlib.suppress(Exception):
            await client.close()


async def measure_webrtc(runs: int, prefetch: int, lead_s: float) -> list[dict]:
    from duplex.transport.ice import allow_loopback_candidates
    from duplex.transport.server import Server, ServerOptions

    allow_loopback_candidates()
    first, second = _phrases()
    agent = await Agent.load(AgentConfig(profile="fake", device="cpu", fake=dict(FAKE)))
    server = Server(agent, ServerOptions(max_sessions=2))
    try:
        async with server.on_loopback() as url:
            rows = []
            for i in range(runs):
                delayed, phase = _delayed(second, i, runs)
                rows.append({**await _one(url, server, prefetch, lead_s, first, delayed), "phase_ms": phase})
            return rows
    finally:
        await agent.aclose()


class SoundCard:
    """A simulated full-duplex sound card for ``duplex mic`` (:class:`~.mic.AudioDevice`): every
    20 ms of the loop clock the callback gets the next microphone block (captured over the 20 ms
    before) and fills a speaker block, heard ``output_latency_s`` later (PortAudio's "low" latency
    on a desktop is ~10-20 ms). No echo: the echo guard's rooms are ``duplex bench echo``'s."""

    def __init__(self, first: np.ndarray, output_latency_s: float = 0.01) -> None:
        self.rate, self.block = RATE, FRAME
        self.output_latency_s, self.latency_s = output_latency_s, 2 * output_latency_s
        self.mic = list(first[:len(first) // FRAME * FRAME].reshape(-1, FRAME))
        self.heard: list[tuple[float, np.ndarray]] = []  # (when the block starts being heard, its samples)
        self.onset_wall: float | None = None
        self._t0 = 0.0
        self._k = 0  # callbacks so far
        self._task: asyncio.Task | None = None
        self.audible = asyncio.Event()  # the agent's voice has reached the speaker

    def go(self, second: np.ndarray) -> None:
        """The user starts ``second`` with the next block captured."""
        offset = _onset(second, ONSET_RMS, 96)
        self.mic = list(second[:len(second) // FRAME * FRAME].reshape(-1, FRAME))
        self.onset_wall = self._t0 + self._k * 0.02 + max(0, offset) / RATE

    def start(self, callback) -> None:
        self._task = asyncio.create_task(self._run(callback))

    async def _run(self, callback) -> None:
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        while True:
            await asyncio.sleep(max(0.0, self._t0 + (self._k + 1) * 0.02 - loop.time()))
            mic = self.mic.pop(0) if self.mic else np.zeros(FRAME, np.float32)
            speaker = np.zeros(FRAME, np.float32)
            callback(mic.astype(np.float32), speaker)
            self.heard.append((loop.time() + self.output_latency_s, speaker))
            if np.abs(speaker).max() > 0.05:
                self.audible.set()
            self._k += 1

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def _one_socket(url: str, lead_s: float, first: np.ndarray, second: np.ndarray) -> dict:
    """One barge-in over ``/v1/realtime``: a client that sends its microphone in 20 ms appends (each
    when its last sample is captured) and plays each audio delta as it arrives, until told
    ``output_audio_buffer.cleared``."""
    import base64
    import json

    import aiohttp

    from duplex.audio import resample

    rate = 24_000
    block = rate // 50
    played: list[tuple[float, bool]] = []  # (arrival, audible) of each audio delta
    told: list[float] = []
    loop = asyncio.get_running_loop()
    onset_wall: float | None = None
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{url}/v1/realtime") as ws:

        async def listen() -> None:
            async for msg in ws:
                event = json.loads(msg.data)
                if event["type"] == "response.output_audio.delta":
                    pcm = np.frombuffer(base64.b64decode(event["delta"]), "<i2").astype(np.float32) / 32768
                    played.append((loop.time(), bool(np.sqrt(np.mean(pcm ** 2)) > AUDIBLE_RMS)))
                elif event["type"] == "output_audio_buffer.cleared":
                    told.append(loop.time())

        listening = asyncio.create_task(listen())
        start, sent, queue = loop.time(), 0, resample(first, RATE, rate)
        heard_at: float | None = None
        try:
            while not told and loop.time() - start < 30:
                await asyncio.sleep(max(0.0, start + (sent + 1) * 0.02 - loop.time()))
                if heard_at is None and any(a for _, a in played):
                    heard_at = loop.time()  # the reply is heard: talk over it lead_s later
                if onset_wall is None and heard_at is not None and loop.time() >= heard_at + lead_s:
                    queue = resample(second, RATE, rate)  # captured from the start of this block on
                    onset_wall = start + sent * 0.02 + max(0, _onset(queue, ONSET_RMS, 48)) / rate
                chunk, queue = queue[:block], queue[block:]
                chunk = np.pad(chunk, (0, block - len(chunk)))
                data = base64.b64encode((np.clip(chunk, -1, 1) * 32767).astype("<i2").tobytes()).decode()
                await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": data}))
                sent += 1
            await asyncio.sleep(0.3)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
    if onset_wall is None or not told:
        return {"told_ms": None, "ear_ms": None, "late_deltas": None}
    heard = [t + 0.02 for t, audible in played if audible and onset_wall <= t + 0.02 and t < told[0]]
    ear = min(told[0], max(heard)) if heard else onset_wall
    return {"told_ms": round(1000 * (told[0] - onset_wall), 1), "ear_ms": round(1000 * (ear - onset_wall), 1),
            # audible audio the server still sent 20 ms or more after telling the client to drop it
            "late_deltas": sum(1 for t, audible in played if audible and t > told[0] + 0.02)}


async def measure_realtime(runs: int, lead_s: float) -> list[dict]:
    from duplex.transport.server import Server, ServerOptions

    first, second = _phrases()
    agent = await Agent.load(AgentConfig(profile="fake", device="cpu", fake=dict(FAKE)))
    server = Server(agent, ServerOptions(max_sessions=2))
    rows = []
    try:
        async with server.on_loopback() as url:
            for i in range(runs):
                delayed, phase = _delayed(second, i, runs)
                rows.append({**await _one_socket(url, lead_s, first, delayed), "phase_ms": phase})
    finally:
        await agent.aclose()
    return rows


async def measure_mic(runs: int, lead_s: float, output_latency_s: float = 0.01) -> list[dict]:
    """The same barge-in through ``duplex mic``'s path (:class:`~.mic.MicLink`) on a
    :class:`SoundCard`. Without the echo guard: it delays nothing (AEC3 works block by block), but
    in a room with no echo it would take the first second of the reply to learn that, and hold back
    speech not clearly louder than the agent meanwhile (``duplex bench echo`` measures it)."""
    from duplex.transport.mic import talk

    guard = False
    first, second = _phrases()
    agent = await Agent.load(AgentConfig(profile="fake", device="cpu", fake=dict(FAKE)))
    rows = []
    try:
        for i in range(runs):
            delayed, phase = _delayed(second, i, runs)
            card = SoundCard(first, output_latency_s)
            session = agent.session()
            events = session.events()
            stop = asyncio.Event()
            talking = asyncio.create_task(talk(session, card, guard=guard, stop=stop))
            await asyncio.wait_for(card.audible.wait(), 20)  # the reply is heard
            await asyncio.sleep(lead_s)
            card.go(delayed)
            await asyncio.sleep(1.0)
            stop.set()
            link = await talking
            seen = [e async for e in events]  # (the session is closed: they end)
            metric = next((e.value for e in seen if isinstance(e, ev.Metric) and e.name == "barge_in_s"), None)
            assert card.onset_wall is not None
            ear = max((w + _last_above(b, AUDIBLE_RMS, 48) / RATE for w, b in card.heard
                       if w + 0.02 >= card.onset_wall and _last_above(b, AUDIBLE_RMS, 48)), default=None)
            clicks, cut_clicks = _clicks([w for w, _ in card.heard], [b for _, b in card.heard], ear)
            rows.append({"ear_ms": None if ear is None else round(1000 * (ear - card.onset_wall), 1),
                         "server_ms": None if metric is None else round(1000 * metric, 1),
                         "clicks": clicks, "cut_clicks": cut_clicks,
                         "underruns": link.underruns, "dropped": link.overflows, "echo_guard": guard,
                         "phase_ms": phase})
    finally:
        await agent.aclose()
    return rows


def _summary(rows: list[dict]) -> dict:
    ears = [r["ear_ms"] for r in rows if r["ear_ms"] is not None]
    servers = [r["server_ms"] for r in rows if r["server_ms"] is not None]
    return {"ear_ms_best": min(ears, default=None),
            "ear_ms_median": round(statistics.median(ears), 1) if ears else None,
            "server_ms_median": round(statistics.median(servers), 1) if servers else None,
            "clicks": sum(r["clicks"] for r in rows), "cut_clicks": sum(r["cut_clicks"] for r in rows),
            "underruns": sum(r["underruns"] for r in rows),
            "dropped": sum(r["dropped"] for r in rows)}  # (mic: blocks the speaker queue overflowed)


def run(args: argparse.Namespace) -> dict:
    """``duplex bench barge-in``: prints one line per run and the summary; returns the figures."""
    runs = getattr(args, "runs", None) or (2 if getattr(args, "quick", False) else 3)
    prefetch = getattr(args, "client_prefetch", None) or 2
    lead = getattr(args, "lead", None) or 0.6
    rows = asyncio.run(measure_webrtc(runs, prefetch, lead))
    for i, r in enumerate(rows):
        print(f"webrtc run {i + 1}: {r}", flush=True)
    summary = _summary(rows)
    print(f"webrtc (plain client, jitter buffer {prefetch} frames): {summary}", flush=True)
    mic_rows = asyncio.run(measure_mic(runs, lead))
    for i, r in enumerate(mic_rows):
        print(f"mic run {i + 1}: {r}", flush=True)
    mic_summary = _summary(mic_rows)
    print(f"mic (simulated sound card, 10 ms output latency): {mic_summary}", flush=True)
    socket_rows = asyncio.run(measure_realtime(runs, lead))
    for i, r in enumerate(socket_rows):
        print(f"realtime run {i + 1}: {r}", flush=True)
    told = [r["told_ms"] for r in socket_rows if r["told_ms"] is not None]
    ears = [r["ear_ms"] for r in socket_rows if r["ear_ms"] is not None]
    socket_summary = {"told_ms_median": round(statistics.median(told), 1) if told else None,
                      "ear_ms_best": min(ears, default=None),
                      "ear_ms_median": round(statistics.median(ears), 1) if ears else None}
    print(f"realtime websocket (a client playing each delta on arrival, dropping the rest when told): "
          f"{socket_summary}", flush=True)
    return {"webrtc": {"runs": rows, **summary, "client_prefetch": prefetch},
            "mic": {"runs": mic_rows, **mic_summary, "output_latency_s": 0.01},
            "realtime": {"runs": socket_rows, **socket_summary}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="barge-ins per transport (the best is the figure)")
    parser.add_argument("--client-prefetch", type=int, default=2, help="frames the client's jitter buffer holds")
    parser.add_argument("--lead", type=float, default=0.6, help="seconds of the reply heard before the user speaks")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
