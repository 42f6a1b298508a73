"""Bad audio reaches the ASR stream without crashing it or poisoning its state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asr_fixtures import TokenLog, packets, stream_all, tiny_nemo  # noqa: F401 (fixture)
from duplex.errors import AudioFormatError
from duplex.events import TranscriptFinal


def make(model):
    from duplex.asr.streaming import StreamingASR

    asr = StreamingASR(model, context=(70, 1), decoder="rnnt", max_batch=2)
    return asr, TokenLog(asr)


async def run(model, pcm_packets):
    """Encoder output, tokens and events of one stream fed ``pcm_packets``, then ended."""
    asr, log = make(model)
    stream = asr.new_stream()
    stream.state.encoded = []
    events = await stream_all(stream, pcm_packets)
    events += await stream.endpoint()
    await stream.aclose()
    await asr.aclose()
    encoded = torch.cat(stream.state.encoded, dim=1) if stream.state.encoded else torch.zeros(0)
    return encoded, log.of(stream, flushed=True), events


async def test_nan_and_inf_count_as_silence(tiny_nemo, jfk16):
    """NaN and infinite samples (a broken microphone) are zeroed: the stream gives exactly what it gives
    for the same audio with zeros there, and its state stays finite for the speech that follows."""
    pcm = jfk16[: 4 * 16000].copy()
    broken = pcm.copy()
    broken[8000:12000] = np.nan
    broken[20000:20100] = np.inf
    broken[30000] = -np.inf
    clean = pcm.copy()
    clean[8000:12000] = 0.0
    clean[20000:20100] = 0.0
    clean[30000] = 0.0
    enc_b, tok_b, _ = await run(tiny_nemo, packets(broken, seed=1))
    enc_c, tok_c, _ = await run(tiny_nemo, packets(clean, seed=1))
    assert torch.isfinite(enc_b).all()
    assert torch.equal(enc_b, enc_c) and tok_b == tok_c


async def test_clipping_and_int16(tiny_nemo, jfk16):
    """Float input beyond [-1, 1] is clipped (same result as clipping it first); int16 packets are
    scaled to [-1, 1] (same result as the float audio)."""
    pcm = jfk16[: 3 * 16000]
    loud = pcm * 20.0
    enc_loud, tok_loud, _ = await run(tiny_nemo, packets(loud, seed=2))
    enc_clip, tok_clip, _ = await run(tiny_nemo, packets(np.clip(loud, -1, 1), seed=2))
    assert torch.equal(enc_loud, enc_clip) and tok_loud == tok_clip
    as_int16 = (pcm * 32768).round().clip(-32768, 32767).astype(np.int16)
    enc_i, tok_i, _ = await run(tiny_nemo, packets(as_int16, seed=2))
    enc_f, tok_f, _ = await run(tiny_nemo, packets(as_int16.astype(np.float32) / 32768, seed=2))
    assert torch.equal(enc_i, enc_f) and tok_i == tok_f


async def test_silence_short_and_empty_input(tiny_nemo):
    """Digital silence streams fine (finite encoder output); a single sample, an empty packet, an
    endpoint before any audio and an endpoint right after another all answer without error."""
    enc, _, _ = await run(tiny_nemo, packets(np.zeros(3 * 16000, dtype=np.float32), seed=3))
    assert enc.size(1) > 30 and torch.isfinite(enc).all()
    asr, _ = make(tiny_nemo)
    stream = asr.new_stream()
    assert await stream.endpoint() == []
    assert await stream.feed(np.zeros(0, dtype=np.float32)) == []
    assert await stream.feed(np.array([0.3], dtype=np.float32)) == []
    finals = await stream.endpoint()
    assert all(f.text for f in finals)
    assert await stream.endpoint() == []
    assert await stream.feed(np.zeros(100, dtype=np.float32)) == []
    await stream.aclose()
    await stream.aclose()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        await stream.feed(np.zeros(160, dtype=np.float32))
    assert await stream.endpoint() == []
    await asr.aclose()


async def test_wrong_shapes_and_types(tiny_nemo, jfk16):
    """Stereo [T, 2] packets are mixed down (same as mono); a channels-first [2, T] block, a 3-D array
    or strings raise AudioFormatError naming the problem, and the stream keeps working after."""
    pcm = jfk16[: 2 * 16000]
    stereo = [np.stack([p, p], axis=1) for p in packets(pcm, seed=4)]
    enc_s, tok_s, _ = await run(tiny_nemo, stereo)
    enc_m, tok_m, _ = await run(tiny_nemo, packets(pcm, seed=4))
    assert torch.equal(enc_s, enc_m) and tok_s == tok_m
    asr, _ = make(tiny_nemo)
    stream = asr.new_stream()
    with pytest.raises(AudioFormatError, match="channels-first"):
        await stream.feed(np.zeros((2, 4000), dtype=np.float32))
    with pytest.raises(AudioFormatError, match="1-D"):
        await stream.feed(np.zeros((2, 2, 2), dtype=np.float32))
    with pytest.raises(AudioFormatError, match="unsupported sample type"):
        await stream.feed(np.array(["a", "b"]))
    assert stream.samples_fed == 0
    await stream.feed(pcm)
    assert stream.state.n_chunks > 5
    await asr.aclose()


async def test_cancelled_feed_keeps_state_whole(tiny_nemo, jfk16):
    """Cancelling feed() while a step that emits words runs never tears the stream: the step lands,
    its words join the transcript, the cancellation propagates, and the next feed() carries on;
    encoder output, tokens and the final end up equal to an uninterrupted run's."""
    import asyncio

    pcm = jfk16[: 5 * 16000]
    reference, ref_tokens, ref_events = await run(tiny_nemo, [pcm[:16000], pcm[16000:]])
    asr, log = make(tiny_nemo)
    loop = asyncio.get_running_loop()
    feeding: dict[str, asyncio.Task] = {}
    inner = asr._batch._step

    def step(states):  # cancel the feed from inside the first later step that emits tokens
        results = inner(states)
        if "task" in feeding and results[0].tokens and not feeding.get("cancelled"):
            feeding["cancelled"] = loop.call_soon_threadsafe(feeding["task"].cancel)
        return results

    asr._batch._step = step
    stream = asr.new_stream()
    stream.state.encoded = []
    await stream.feed(pcm[:16000])
    feeding["task"] = asyncio.create_task(stream.feed(pcm[16000:]))  # many chunks: several steps
    with pytest.raises(asyncio.CancelledError):
        await feeding["task"]
    assert stream.state.n_chunks < reference.size(1) // asr.plan.out  # it was stopped part-way
    await stream.feed(np.zeros(0, dtype=np.float32))  # picks up the chunks already fed
    finals = await stream.endpoint()
    encoded = torch.cat(stream.state.encoded, dim=1)
    assert torch.equal(encoded, reference)
    assert log.of(stream, flushed=True) == ref_tokens
    # the words of the step that landed under the cancellation are in the transcript too
    assert [f.text for f in finals] == [e.text for e in ref_events if isinstance(e, TranscriptFinal)]
    await asr.aclose()


async def test_vad_network_is_silero_s_own(vad_model, jfk16):
    """Our forward of Silero's network (``duplex.asr.silero``, the weights read from its TorchScript
    file) gives the TorchScript network's numbers: on random windows and states of five streams at
    once, and a stream's probabilities over 3 s of speech equal the TorchScript network's run window
    by window with its own state (to float rounding; on this CPU the same kernels, bit for bit)."""
    from duplex.asr.silero import CONTEXT, WINDOW, silero_forward
    from duplex.asr.vad import silero_jit_path

    jit = torch.jit.load(str(silero_jit_path()), map_location="cpu")._model.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, CONTEXT + WINDOW, generator=g) * 0.1
    state = torch.randn(2, 5, 128, generator=g) * 0.5
    with torch.no_grad():
        want, want_state = jit(x, state)
        got, h, c = silero_forward(vad_model.net.w, x, state[0], state[1])
    assert float((got - want[:, 0]).abs().max()) <= 1e-6
    assert float((torch.stack([h, c]) - want_state).abs().max()) <= 1e-6

    audio = jfk16[:3 * 16000]
    stream = vad_model.new_stream()
    for i in range(0, len(audio), 320):
        await stream.feed(audio[i:i + 320])
    await stream.aclose()
    reference, state = [], torch.zeros(2, 1, 128)
    previous = np.zeros(CONTEXT, np.float32)
    with torch.no_grad():
        for k in range(len(audio) // WINDOW):
            block = audio[k * WINDOW:(k + 1) * WINDOW]
            out, state = jit(torch.from_numpy(np.concatenate([previous, block]))[None], state)
            previous = block[-CONTEXT:]
            reference.append(float(out[0, 0]))
    assert len(stream.probs) == len(reference) == 93
    assert np.abs(np.array(stream.probs) - np.array(reference)).max() <= 1e-6
    assert max(reference) > 0.9 and min(reference) < 0.1  # speech and silence both


async def test_vad_voice_edge_comes_one_window_before_speech_started(vad_model, jfk16):
    """On real speech each SpeechStarted is preceded by a voiced VoiceEdge at the same start, one
    32 ms window earlier (min_speech_ms is two windows), and each SpeechStopped by an unvoiced edge
    at its end: what pauses the agent under the user's voice comes a window before the speech is sure."""
    from duplex import events as ev

    stream = vad_model.new_stream()
    found = []
    for i in range(0, len(jfk16), 320):
        found += await stream.feed(jfk16[i:i + 320])
    started = [e for e in found if isinstance(e, ev.SpeechStarted)]
    stopped = [e for e in found if isinstance(e, ev.SpeechStopped)]
    assert len(started) >= 3 and stopped
    for e in started:
        edge = next(x for x in found if isinstance(x, ev.VoiceEdge) and x.voiced and x.at == e.start)
        assert edge.stream_samples == e.stream_samples - 512
    for e in stopped:
        assert any(isinstance(x, ev.VoiceEdge) and not x.voiced and x.at == e.end for x in found)
    voiced = [x.voiced for x in found if isinstance(x, ev.VoiceEdge)]
    assert all(a != b for a, b in zip(voiced, voiced[1:]))  # edges alternate


async def test_vad_peek_finds_voice_sooner_and_changes_nothing_else(vad_model, jfk16):
    """Peeking (what the session does while the agent speaks) scores the newest audio before its
    window is whole, from a copy of the state: the speech boundaries and every whole window's
    probability are exactly those of a stream that never peeked, and each onset's first voiced
    edge comes no later, for some a 20 ms block sooner."""
    from duplex import events as ev

    async def run(peek: bool):
        stream = vad_model.new_stream()
        found = []
        for i in range(0, len(jfk16), 320):
            found += await stream.feed(jfk16[i:i + 320], peek=peek)
        return found, list(stream.probs)

    plain, plain_probs = await run(False)
    peeked, peeked_probs = await run(True)
    bounds = (ev.SpeechStarted, ev.SpeechStopped)
    assert [(type(e), e.stream_samples) for e in plain if isinstance(e, bounds)] == \
        [(type(e), e.stream_samples) for e in peeked if isinstance(e, bounds)]
    assert plain_probs == peeked_probs
    sooner = 0
    for start in (e for e in plain if isinstance(e, ev.SpeechStarted)):
        first = next(x for x in plain if isinstance(x, ev.VoiceEdge) and x.voiced and x.at == start.start)
        early = [x for x in peeked if isinstance(x, ev.VoiceEdge) and x.voiced
                 and first.stream_samples - 2 * 512 <= x.stream_samples <= first.stream_samples]
        assert early, start
        sooner += early[0].stream_samples < first.stream_samples
    assert sooner >= 1


def test_vad_sessions_at_scattered_phases_step_together_on_the_clock_and_stay_exact(vad_model, jfk16):
    """Four sessions whose 20 ms blocks arrive 5 ms apart (as real peers' do) are stepped together
    on the engines' 20 ms grid: fewer VAD ticks than periods, several sessions in each (without the
    clock each window ticked alone), and every session's speech events exactly those of one session
    fed alone, its probabilities within float rounding of them. On the virtual clock."""
    import asyncio

    from duplex.clock import run_virtual

    audio = jfk16[:16000 * 3]

    async def feed(stream, phase: float):
        loop = asyncio.get_running_loop()
        await asyncio.sleep(phase)
        found, t = [], loop.time()
        for i in range(0, len(audio), 320):
            found += await stream.feed(audio[i:i + 320])
            t += 0.02
            await asyncio.sleep(max(0.0, t - loop.time()))
        return [(type(e).__name__, e.stream_samples) for e in found], list(stream.probs)

    async def main(n: int):
        worker = vad_model.worker
        start = worker.ticks
        got = await asyncio.gather(*(feed(vad_model.new_stream(), 0.005 * i) for i in range(n)))
        return got, worker.ticks_since(start)

    (alone,), _ = run_virtual(main(1))
    together, ticks = run_virtual(main(4))
    for events, probs in together:  # the network's batched matmuls round differently from batch 1's
        assert events == alone[0]
        # the rounding carried through ~90 windows of the LSTM's state: 1.2e-5 seen on one CPU
        assert len(probs) == len(alone[1]) and np.abs(np.array(probs) - np.array(alone[1])).max() < 5e-5
    assert alone[0] and len(alone[1]) > 80  # speech was found, in ~90 windows
    assert len(ticks) <= 3 / 0.02 + 1 and sum(t.rows for t in ticks) / len(ticks) > 2  # ~2.5 of 4 have a window


def test_a_stream_far_behind_catches_up_with_one_copy_a_second_and_stays_exact(vad_model, jfk16):
    """A stream 70 windows (2.2 s) behind, stepped in one tick beside a stream with 5 windows and a
    peek, runs in steps of 4 windows whose inputs and counts move into place on the device: the
    tick copies back once per 32 windows (3 host syncs here, counted where a GPU would wait; one
    per step before), and both streams' probabilities are those of their windows run one at a
    time through the network with their own state (to the rounding a batch of two carries through
    the LSTM's state, as in the scattered-phases test), the peek too."""
    import math

    from duplex.asr.silero import CATCH_UP, CONTEXT, WINDOW, silero_forward
    from tests.graph_safety import HostSyncs

    def windows(audio: np.ndarray, n: int) -> np.ndarray:
        padded = np.concatenate([np.zeros(CONTEXT, np.float32), audio[:n * WINDOW]])
        return np.stack([padded[k * WINDOW:k * WINDOW + CONTEXT + WINDOW] for k in range(n)])

    far, near = windows(jfk16, 70), windows(jfk16[16000:], 5)
    peek = windows(jfk16[16000 + 5 * WINDOW:], 1)[0]
    net = vad_model.net
    rows = [net.rows.take(), net.rows.take()]
    try:
        with HostSyncs() as syncs:
            (far_probs, _), (near_probs, near_peek) = net.run([(rows[0], True, far, None), (rows[1], True, near, peek)])
    finally:
        for row in rows:
            net.rows.give(row)
    assert len(syncs.counts) == math.ceil(70 / CATCH_UP) == 3, syncs.counts

    def alone(x: np.ndarray, extra: np.ndarray | None = None) -> list[float]:
        h = c = torch.zeros(1, 128)
        out = []
        with torch.no_grad():
            for w in (*x, *([] if extra is None else [extra])):
                p, h, c = silero_forward(net.w, torch.from_numpy(np.ascontiguousarray(w))[None], h, c)
                out.append(float(p[0]))
        return out

    assert len(far_probs) == 70 and np.abs(far_probs - np.array(alone(far))).max() < 5e-5
    want = alone(near, peek)
    assert len(near_probs) == 5 and np.abs(near_probs - np.array(want[:5])).max() < 5e-5
    assert near_peek is not None and abs(near_peek - want[5]) < 5e-5


async def test_a_vad_step_that_cannot_be_captured_runs_eagerly(monkeypatch, caplog, jfk16):
    """Where capturing the VAD's step fails (a GPU's graph capture raising), the load reports it and
    the step runs eagerly on the same device, with the same probabilities."""
    from duplex.asr import silero
    from duplex.asr.vad import SileroVAD
    from duplex.engine.graphs import BucketedStep

    plain = SileroVAD(max_batch=2)

    def refuse(self, prepare=None, progress=None, warmup=2):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(BucketedStep, "capture", refuse)
    monkeypatch.setattr(silero, "BucketedStep", lambda *a, **k: _enabled(BucketedStep(*a, **k)))
    with caplog.at_level("WARNING"):
        vad = SileroVAD(max_batch=2)
    assert "could not be captured" in caplog.text and "runs eagerly" in caplog.text
    assert not vad.net.graphs.graphs_enabled and not vad.net.peek_graphs.graphs_enabled

    async def probs(model) -> list[float]:
        stream = model.new_stream()
        for i in range(0, 16000, 320):
            await stream.feed(jfk16[i:i + 320])
        return list(stream.probs)

    assert await probs(vad) == await probs(plain)


def _enabled(step):
    step.graphs_enabled = True  # as on CUDA: capture() is asked to record graphs
    return step
