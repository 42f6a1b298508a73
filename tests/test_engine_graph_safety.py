"""The steps the engines capture as CUDA graphs can be replayed: checked on the CPU, op by op.

No GPU runs these tests. A captured graph replays the kernels of one call with their addresses,
shapes and Python arguments fixed, so each test drives an engine through real sessions and checks
two things with :class:`graph_safety.StepTrace`. First, every session's call of a (bucket, length)
runs what the capture call ran (made first, as a GPU makes it at load, on the same inputs), reading
the same buffers. Second, no call syncs with the host, draws
from a generator, makes a tensor from host data, or makes a shape that depends on data. These
tests guard the code path a GPU takes, which the CPU runs eagerly.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from duplex.engine.graphs import BucketedStep
from duplex.llm.engine import DecodeRequest, Draw
from duplex.stages import Message
from graph_safety import StepTrace
from llm_fixtures import ARCHS, SHORT_SYSTEM, make_llm, tiny_checkpoints, single_torch_thread  # noqa: F401
from tts_fixtures import jfk24, make_engine, one_torch_thread, tiny_tts_checkpoint, voice_a  # noqa: F401
from asr_fixtures import tiny_nemo  # noqa: F401


def test_the_check_catches_what_a_replay_would_get_wrong():
    """The check itself: a step that syncs with the host (item, tolist, an equality test), masks by
    value, builds a tensor from a Python list, draws from torch's generator, reads a buffer replaced
    between calls, bakes in a Python number, picks between two results by a Python flag, reads a
    host staging buffer or rebinds its output buffer is caught, each with its reason. A step that
    only reads its static buffers passes."""
    buf = {"x": torch.arange(8.0), "out": torch.zeros(8)}
    calls = {"n": 0}

    def clean(b: int, length: int) -> None:
        buf["out"][:b] = buf["x"][:b] * 2

    def syncs(b: int, length: int) -> None:
        buf["out"][:b] = buf["x"][:b] * float(buf["x"][0])

    def masks(b: int, length: int) -> None:
        x = buf["x"][:b]
        buf["out"][: int((x > 2).sum())] = x[x > 2]

    def host_list(b: int, length: int) -> None:
        buf["out"][:b] = buf["x"][:b] + torch.tensor([1.0] * b)

    def draws(b: int, length: int) -> None:
        buf["out"][:b] = torch.rand(b)

    def replaced(b: int, length: int) -> None:
        calls["n"] += 1
        buf["x"] = buf["x"].clone()  # a new tensor: a captured graph would still read the old one
        buf["out"][:b] = buf["x"][:b] + 1

    def python_number(b: int, length: int) -> None:
        calls["n"] += 1
        buf["out"][:b] = buf["x"][:b] + calls["n"]  # baked into the graph at capture

    def to_list(b: int, length: int) -> None:
        buf["out"][:b] = buf["x"][:b] * len(buf["x"][:b].tolist())

    def compares(b: int, length: int) -> None:
        buf["out"][:b] = buf["x"][:b] * (2 if torch.equal(buf["x"], buf["out"]) else 3)

    def branch(b: int, length: int) -> None:
        calls["n"] += 1
        doubled, tripled = buf["x"][:b] * 2, buf["x"][:b] * 3
        buf["out"][:b] = doubled if calls["n"] % 2 else tripled  # a replay keeps the first choice

    def staging(b: int, length: int) -> None:
        buf["out"][:b] = buf["staging"][:b]  # on a GPU: the host buffer the inputs are copied from

    class Engine:
        def __init__(self) -> None:
            self.out = torch.zeros(8)

        def rebinds(self, b: int, length: int) -> None:
            self.out = buf["x"] * 2  # a new tensor: a graph would write to the old one

    buf["staging"] = torch.zeros(8)
    expected = {clean: None, syncs: "host sync", masks: "depends on data", host_list: "host data",
                draws: "random generator", replaced: "differs from call 1", python_number: "differs from call 1",
                to_list: "host sync", compares: "host sync", branch: "differs from call 1",
                staging: "host staging buffer", Engine().rebinds: "rebinds"}
    for fn, why in expected.items():
        step = BucketedStep("check", fn, (4,), (16,), device="cpu", graphs=False)
        trace = StepTrace(step, host_buffers=[buf["staging"]])
        with torch.inference_mode():  # as the engines run their steps
            for _ in range(3):
                step.run(3, 10)
        problems = trace.problems()
        if why is None:
            assert problems == [] and trace.repeated == 2, problems
        else:
            assert problems and any(why in p for p in problems), (fn.__name__, problems)
        trace.restore()


@pytest.mark.parametrize("arch", ARCHS)
def test_llm_decode_step_replays(make_llm, arch):
    """LLM decode steps with sessions at different positions and with different draws (greedy,
    sampled, with stop tokens banned or not), in batches of 1-3 rows of a bucket of 4, over the
    length buckets 256 and 512 of a 600-position window (one session holds 300), and with the stop
    tokens changed between steps. Every call of a (batch, length) bucket runs the same ops on the
    same buffers, and none is forbidden."""
    llm = make_llm(arch, window=600, slots=4)
    engine = llm.engine
    trace = StepTrace(engine.graphs, host_buffers=[engine._buf.ints.staging, engine._buf.floats.staging])
    try:
        engine.graphs.rehearse = True  # first, each bucket's call as a GPU captures it at load
        engine.capture()
        g = torch.Generator().manual_seed(1)
        slots = [engine.new_slot() for _ in range(3)]
        last = []
        for slot, n in zip(slots, (5, 17, 300)):
            logits = engine.prefill(slot, torch.randint(0, engine.vocab, (n,), generator=g).tolist())
            last.append(engine.sample(logits[None], [Draw(0.0, 1.0, 0, 0)])[0])
        draws = [Draw(0.0, 1.0, 0, 0), Draw(0.9, 0.8, 7, 0, ban_stop=True), Draw(1.2, 1.0, 3, 0)]
        groups = [[0], [0, 1], [0, 1, 2], [1, 2], [2], [0, 2], [0, 1, 2]]
        for step, group in enumerate(groups):
            if step == 3:
                engine.set_stop_ids([1, 2, 3])
            requests = [DecodeRequest(slots[i], last[i], Draw(d.temperature, d.top_p, d.seed, step + 1, d.ban_stop))
                        for i, d in ((i, draws[i]) for i in group)]
            for i, token in zip(group, engine.decode(requests)):
                slots[i].length += 1
                last[i] = token
        for slot in slots:
            engine.release(slot)
    finally:
        trace.restore()
    # batch buckets 1, 2 and 4 over 256 positions and over 512, most seen again
    assert {(1, 256), (2, 256), (1, 512), (2, 512), (4, 512)} <= set(trace.calls) and trace.repeated >= 2
    assert trace.fewest_ops > 50  # every layer's ops were seen (the step runs under inference mode)
    assert trace.problems() == []


def test_llm_replies_through_the_scheduler_replay(make_llm):
    """Replies decoded through the scheduler, across evictions and rollbacks (the window is
    small): all of them run in one bucket, and every call matches the first."""
    llm = make_llm("qwen2", window=96, max_reply_tokens=30, temperature=0.8, slots=2)
    trace = StepTrace(llm.engine.graphs, host_buffers=[llm.engine._buf.ints.staging, llm.engine._buf.floats.staging])
    llm.engine.graphs.rehearse = True  # first, each bucket's call as a GPU captures it at load
    llm.engine.capture()

    async def main():
        streams = [llm.new_stream(SHORT_SYSTEM) for _ in range(2)]
        dialogues = [[Message("user", "tell me about the train")], [Message("user", "what is the weather")]]
        for _ in range(3):
            texts = await asyncio.gather(*(_speak(s, d) for s, d in zip(streams, dialogues)))
            for dialogue, text, stream in zip(dialogues, texts, streams):
                dialogue += [Message("assistant", text[: len(text) // 2]), Message("user", "go on")]
                await stream.listen(dialogue)
        return await _evictions_then_close(streams)

    evictions = _run_traced(trace, main())
    assert min(evictions) >= 1 and trace.repeated >= 50 and trace.fewest_ops > 50
    assert trace.problems() == []


def test_llm_prefill_pass_replays(make_llm):
    """The prefill pass of several sessions (listens whose words grow, are revised and are scored
    on top of replies, and reply starts) through the scheduler, across evictions: every call of a
    (batch, tokens) bucket runs what its capture call ran, on the same buffers, and none is forbidden;
    so does every call of the verdict step that reads the passes' estimates and first tokens."""
    llm = make_llm("qwen2", window=96, max_reply_tokens=12, temperature=0.8, slots=4)
    pre, verdicts = llm.engine._pre, llm.engine._verdicts
    trace = StepTrace(llm.engine.prefill_graphs, host_buffers=[pre.tokens.staging, pre.meta.staging])
    judged = StepTrace(llm.engine.verdict_graphs, host_buffers=[verdicts.ints.staging, verdicts.floats.staging])
    llm.engine.prefill_graphs.rehearse = True  # first, each bucket's call as a GPU captures it at load
    llm.engine.verdict_graphs.rehearse = True
    llm.engine.capture()
    words = "so I was thinking we could go to the lake this weekend if the weather holds up".split()

    async def main():
        streams = [llm.new_stream(SHORT_SYSTEM) for _ in range(3)]
        dialogues: list[list[Message]] = [[] for _ in streams]
        for turn in range(3):
            for k in range(2, len(words), 3):  # the words as partials arrive, the last one revised
                said = [" ".join(words[:k + i] + (["um"] if k % 2 else [])) for i in range(len(streams))]
                await asyncio.gather(*(s.listen(d + [Message("user", w)]) for s, d, w in zip(streams, dialogues, said)))
            for d, i in zip(dialogues, range(len(streams))):
                d.append(Message("user", " ".join(words[: 4 + i + turn])))
            texts = await asyncio.gather(*(_speak(s, d) for s, d in zip(streams, dialogues)))
            for d, text in zip(dialogues, texts):
                d.append(Message("assistant", text))
        return await _evictions_then_close(streams)

    try:
        evictions = _run_traced(trace, main())
    finally:
        judged.restore()
    assert min(evictions) >= 1, evictions
    replayed = [key for key, calls in trace.calls.items() if len(calls) > 1]  # buckets a session's pass used
    assert len(replayed) >= 2 and trace.repeated >= 10, {k: len(v) for k, v in trace.calls.items()}
    assert trace.fewest_ops > 50
    assert trace.problems() == []
    assert judged.repeated >= 10, {k: len(v) for k, v in judged.calls.items()}
    assert judged.fewest_ops > 10
    assert judged.problems() == []


async def _evictions_then_close(streams) -> list[int]:
    """How often each stream's cache evicted; the streams are closed."""
    evictions = [s.context.evictions for s in streams]
    for s in streams:
        await s.aclose()
    return evictions


def _run_traced(trace: StepTrace, scenario):
    """Run the ``scenario`` coroutine; the traced step is restored whatever happens."""
    try:
        return asyncio.run(scenario)
    finally:
        trace.restore()


async def _speak(stream, dialogue) -> str:
    return "".join([piece async for piece in stream.reply(dialogue)])


def test_tts_frame_step_replays(make_engine, voice_a):
    """TTS frame steps (backbone, the depth decoder unrolled over every codebook, top-k sampling)
    for replies with and without a voice prompt, different seeds, joining and ending at different
    steps: every call of a (bucket, attention length) runs the same ops on the same buffers, and
    none is forbidden."""
    from duplex.tts.engine import Sampling
    from duplex.tts.voice import check_voice

    engine = make_engine(sampling=Sampling(), slots=4)
    voice = engine.encode_voice(check_voice(voice_a), voice_a.text)
    trace = StepTrace(engine.graphs, host_buffers=[engine._ints.staging, engine._temperature.staging, engine._draws.staging])
    try:
        engine.graphs.rehearse = True  # first, each bucket's call as a GPU captures it at load
        engine.capture()
        plan = [("Hello there, how are you?", 8, 0), ("A second voice speaks here.", 4, 0),
                ("Third one joins later on.", 6, 2)]
        replies = [engine.new_reply(voice if i % 2 else None, seed=i + 1, chunk_frames=2) for i in range(len(plan))]
        started, done = [False] * len(plan), [False] * len(plan)
        t = 0
        while not all(done):
            for i, (text, frames, start) in enumerate(plan):
                if not started[i] and t >= start:
                    engine.begin_segment(replies[i], text, frames, stop_at_eos=False)
                    started[i] = True
            live = [replies[i] for i in range(len(plan)) if started[i] and not done[i]]
            for reply, step in zip(live, engine.step_frames(live)):
                done[replies.index(reply)] = step.done
            t += 1
        for reply in replies:
            engine.release(reply)
    finally:
        trace.restore()
    assert trace.repeated >= 5 and trace.fewest_ops > 100
    assert trace.problems() == []


def test_tts_segment_pass_replays(make_engine, voice_a):
    """Segment passes of three replies at once (first segments with and without a voice prompt,
    later ones after each reply's frames, texts of different lengths): every call of a (batch,
    embeddings) bucket runs what its capture call ran, on the same buffers, and none is forbidden."""
    from duplex.tts.engine import Sampling, SegmentStart
    from duplex.tts.voice import check_voice

    engine = make_engine(sampling=Sampling(), slots=4)
    voice = engine.encode_voice(check_voice(voice_a), voice_a.text)
    trace = StepTrace(engine.segment_graphs, host_buffers=[engine._segment_meta.staging])
    rounds = [["Hello there.", "A second voice speaks here.", "Third one."],
              ["Then a little more.", "And it goes on a bit.", "Short."],
              ["One more time now.", "The last of them here.", "Done, all of it."]]
    try:
        engine.segment_graphs.rehearse = True  # first, each bucket's call as a GPU captures it at load
        engine.capture()
        replies = [engine.new_reply(voice if i % 2 else None, seed=i + 1, chunk_frames=2) for i in range(3)]
        for texts in rounds:
            starts = [SegmentStart(r, text, 3, stop_at_eos=False) for r, text in zip(replies, texts)]
            assert engine.begin_segments(starts) == [None] * len(starts)
            while any(r.segment is not None for r in replies):
                engine.step_frames([r for r in replies if r.segment is not None])
        for reply in replies:
            engine.release(reply)
    finally:
        trace.restore()
    replayed = [key for key, calls in trace.calls.items() if len(calls) > 1]
    assert replayed and trace.repeated >= 2 and trace.fewest_ops > 30, {k: len(v) for k, v in trace.calls.items()}
    assert trace.problems() == []


def test_asr_steady_encoder_step_replays(tiny_nemo, jfk16):
    """The ASR's steady step (subsampling, conformer layers and label-looping decoding of every later
    chunk), its second step (the frame-looping decoding of a chunk with more labels than the
    first step's label steps, here one) and the captured flush of an endpoint (with its second step,
    the same for a flush), for sessions that
    start at different times (so first and steady chunks share ticks), end utterances (flushes) and
    leave: every call of a bucket runs the same ops on the same buffers, and none is forbidden."""
    from duplex.asr.streaming import StreamingASR
    from asr_fixtures import packets, stream_all

    asr = StreamingASR(tiny_nemo, context=(70, 0), max_batch=4, label_steps=1)
    trace, again = StepTrace(asr.graphs), StepTrace(asr.redecode)
    flush, flush_again = StepTrace(asr.flushes), StepTrace(asr.flushes_again)
    asr.graphs.rehearse = True  # first, each bucket's call as a GPU captures it at load

    async def main():
        await asr.warm_up()
        streams = [asr.new_stream() for _ in range(3)]
        clips = [jfk16[i * 8000:i * 8000 + 3 * 16000] for i in range(3)]

        async def run(i: int):
            await asyncio.sleep(0.05 * i)  # later sessions join while the first is steady
            events = await stream_all(streams[i], packets(clips[i], seed=i))
            await streams[i].endpoint()
            events += await stream_all(streams[i], packets(clips[i][:16000], seed=i + 10))
            await streams[i].aclose()
            return events

        await asyncio.gather(*(run(i) for i in range(3)))
        await asr.aclose()

    try:
        asyncio.run(main())
    finally:
        trace.restore()
        again.restore()
        flush.restore()
        flush_again.restore()
    assert trace.repeated >= 20 and len(trace.calls) >= 2 and trace.fewest_ops > 50
    assert trace.problems() == []
    assert 0 < asr.redecoded < asr.steady_steps
    assert again.repeated >= 5 and again.fewest_ops > 20
    assert again.problems() == []
    assert asr.captured_flushes == 3 and flush.repeated >= 3 and flush.fewest_ops > 50, (flush.repeated,)
    assert flush.problems() == []
    assert asr.flushes_decoded_again >= 1 and flush_again.fewest_ops > 20
    assert flush_again.problems() == []


def test_vad_step_replays(jfk16):
    """The VAD's step (every stream's windows of a tick, then their peeks, the states in rows of one
    buffer), for streams that start at different times, peek while the agent would speak, fall behind
    (a backlog of ten windows: steps of 4, 4 and 2), close and open again on a reused row: every call
    of a bucket runs the same ops on the same buffers as its capture call, and none is forbidden (no
    host staging buffer read, no sync). The streams' probabilities are those each gets alone."""
    import numpy as np

    from duplex.asr.vad import SileroVAD

    vad = SileroVAD(max_batch=4)
    net = vad.net
    staging = [net._windows.staging, net._peeks.staging, net._meta.staging]
    traces = [StepTrace(step, staging) for step in (net.graphs, net.peek_graphs)]
    for step in (net.graphs, net.peek_graphs):
        step.rehearse = True
    net.capture()  # each bucket's call as a GPU captures it at load

    async def alone(audio, peek_from: int, backlog: bool = False) -> list[float]:
        stream = vad.new_stream()
        if backlog:
            await stream.feed(audio[:10 * 512 + 100])
            audio = audio[10 * 512 + 100:]
        for i in range(0, len(audio), 320):
            await stream.feed(audio[i:i + 320], peek=i >= peek_from)
        probs = list(stream.probs)
        await stream.aclose()
        return probs

    async def main():
        clips = [jfk16[i * 8000:i * 8000 + 2 * 16000] for i in range(3)]

        async def run(i: int) -> list[float]:
            await asyncio.sleep(0.01 * i)
            return await alone(clips[i], peek_from=16000 if i else 0, backlog=i == 2)

        together = await asyncio.gather(*(run(i) for i in range(3)))
        again = await alone(clips[0], peek_from=0)  # a reused row, fresh
        return together, again

    try:
        together, again = asyncio.run(main())
    finally:
        for trace in traces:
            trace.restore()
    assert np.abs(np.array(again) - np.array(together[0])).max() <= 1e-5
    for trace in traces:
        assert trace.repeated >= 10 and trace.fewest_ops > 20, (trace.repeated, trace.fewest_ops)
        assert trace.problems() == []
    assert any(depth == 4 for trace in traces for _, depth in trace.calls)  # the backlog's full steps
