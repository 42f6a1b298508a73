"""The engine core in its own process (``engine_core = "process"``): equal to one process, and safe.

- Every stage stream gives across the process boundary exactly what it gives in one process (tiny
  profile, the real models): the VAD's speech boundaries, the ASR's partials and finals, the LLM's
  end-of-turn estimate, reply and backchannel verdict, and the TTS's audio samples and word timings;
  the VAD and the ASR are fed once per window and chunk across it, not once per 20 ms block.
- A reply closed half-way (a barge-in) is closed in the core too: the LLM's reply and the TTS's
  synthesis end there, and the streams a session opened are gone once it closes.
- A core that dies fails the calls waiting on it and every later one with a clear error, a session
  using it ends with that error as its reason, and the agent still closes; a core whose models fail to load reports that error to the frontend.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import numpy as np
import pytest

from duplex.agent import Agent
from duplex.config import AgentConfig
from duplex.e2e import engine_probe
from duplex.stages import Dialogue, Message

QUESTION = Dialogue((Message("user", "hello there"), Message("assistant", "hi, how can I help?")),
                    (Message("user", "tell me about the weather"),))


async def _text(pieces: list[str]) -> AsyncIterator[str]:
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


async def _every_stage(agent: Agent, jfk16: np.ndarray) -> dict[str, object]:
    """What each stage stream of ``agent`` answers to the same inputs, without the wall times."""
    stages = agent.stages
    vad, asr = stages.vad.new_stream(), stages.asr.new_stream()
    llm, tts = stages.llm.new_stream(agent.config.system_prompt), stages.tts.new_stream()
    clip = jfk16[:3 * 16000]
    boundaries, words = [], []
    for i in range(0, len(clip), 320):
        peek = i >= 2 * 16000  # the last second as while the agent speaks: the VAD also peeks
        boundaries += [(type(e).__name__, getattr(e, "start", None), getattr(e, "end", None),
                        getattr(e, "stream_samples", None)) for e in await vad.feed(clip[i:i + 320], peek=peek)]
        words += [(type(e).__name__, e.text) for e in await asr.feed(clip[i:i + 320])]
    words += [(type(e).__name__, e.text) for e in await asr.endpoint()]
    estimate = await llm.listen(QUESTION)
    reply = [piece async for piece in llm.reply(QUESTION)]
    backchannel = await llm.is_backchannel(QUESTION, "yeah")
    chunks = [chunk async for chunk in tts.synthesize(_text(reply))]
    for stream in (vad, asr, llm, tts):
        await stream.aclose()
    sids = {"vad": getattr(vad, "sid", None), "asr": getattr(asr, "sid", None)}  # (streams in an engine core)
    return {"sids": sids, "vad": boundaries, "asr": words, "estimate": estimate, "reply": reply, "backchannel": backchannel,
            "audio": np.concatenate([c.pcm for c in chunks]), "words": [w for c in chunks for w in c.words]}


def _config(engine_core: str, **fields) -> AgentConfig:
    return AgentConfig(profile="tiny", device="cpu", engine_core=engine_core, engine_slots=2, max_reply_tokens=8,
                       fixed_lengths=True, **fields)


def test_every_stage_answers_across_the_process_boundary_as_in_one_process(jfk16, monkeypatch):
    import torch

    # both sides on one torch thread (the core process reads OMP_NUM_THREADS at its start): a
    # reduction split over two threads rounds differently, and the audio is compared bit for bit
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    async def main():
        here = await Agent.load(_config("thread"))
        try:
            alone = await _every_stage(here, jfk16)
        finally:
            await here.aclose()
        there = await Agent.load(_config("process"))
        try:
            probe = await engine_probe(there)
            calls: list[tuple[int, str]] = []
            call = there.core.call
            there.core.call = lambda sid, method, params: calls.append((sid, method)) or call(sid, method, params)  # type: ignore[method-assign]
            remote = await _every_stage(there, jfk16)
            there.core.call = call  # type: ignore[method-assign]
            # the 20 ms blocks that complete no VAD window or ASR chunk stay here and go with the next
            # (the answers agree with one process's, below): one feed per window and per chunk reaches
            # the core (and the first, and the ASR's audio held at its endpoint), not one per block
            feeds = {role: calls.count((sid, "feed")) for role, sid in remote.pop("sids").items()}  # type: ignore[attr-defined]
            blocks = 3 * 16000 // 320
            assert 2 * 16000 // 512 < feeds["vad"] <= 2 * 16000 // 512 + 1 + blocks // 3, feeds  # peeks: every block
            assert 2 <= feeds["asr"] <= blocks // 4, feeds  # a chunk is 80 ms or longer: 4 blocks or more
            seen = await probe()  # the benches read the core's engines across the boundary
            assert seen["ticks"]["llm"] and seen["ticks"]["tts"] and isinstance(seen["listens"], int)
            assert seen["asr_steps"] == (0, 0)  # the CPU's ASR decodes eagerly: no captured steady step
            assert seen["wire"]["core"] >= 1 and seen["wire"]["frontend"] >= 1  # messages per socket write
            assert seen["messages"]["frontend"] >= sum(feeds.values()) and seen["messages"]["core"] > 0
            # a reply closed half-way: the TTS's synthesis and the LLM's reply end in the core too
            llm, tts = there.stages.llm.new_stream(""), there.stages.tts.new_stream()
            tokens = llm.reply(QUESTION)
            audio = tts.synthesize(tokens)  # the text streams from this process into the core's TTS
            first = await anext(audio)
            await audio.aclose()
            await tokens.aclose()  # type: ignore[attr-defined]
            assert len(first.pcm) > 0
            await llm.aclose()
            await tts.aclose()
            # new instructions for a stream across the boundary (a Realtime client's session.update):
            # its next estimate is a fresh stream's under them
            changed, fresh = there.stages.llm.new_stream(""), there.stages.llm.new_stream("Answer in French.")
            await changed.listen(QUESTION)
            await changed.configure("Answer in French.", [])
            remote["configured"] = (await changed.listen(QUESTION), await fresh.listen(QUESTION))
            await changed.aclose()
            await fresh.aclose()
            core = there.core
            assert await core.census() == {"streams": 0, "iterators": 0, "requests": 0, "pulls": 0}
        finally:
            await there.aclose()
        return alone, remote

    try:
        alone, remote = asyncio.run(main())
    finally:
        torch.set_num_threads(threads)
    assert alone["vad"] and alone["asr"] and alone["reply"], "the inputs must exercise every stage"
    for key in ("vad", "asr", "estimate", "reply", "backchannel", "words"):
        assert remote[key] == alone[key], key
    assert np.array_equal(remote["audio"], alone["audio"])
    changed, fresh = remote["configured"]
    assert changed == fresh and changed != remote["estimate"]


def test_a_dead_core_fails_its_calls_clearly_and_the_agent_still_closes():
    from duplex.core.remote import CoreGone

    async def main():
        agent = await Agent.load(AgentConfig(profile="fake", device="cpu", engine_core="process"))
        core = agent.core
        assert core is not None
        llm = agent.stages.llm.new_stream("")
        await llm.listen(QUESTION)  # the core answers while it lives
        session = agent.session()
        events = session.events()
        session.push_audio(np.zeros(1600, np.float32), 16000)
        os.kill(core.process.pid, signal.SIGKILL)
        with pytest.raises(CoreGone, match="engine core process has gone"):
            await asyncio.wait_for(llm.listen(QUESTION), 10)
        with pytest.raises(CoreGone):
            agent.stages.asr.new_stream()
        for _ in range(100):  # the session's next model call fails: it ends, with the reason
            if session.closed:
                break
            session.push_audio(np.zeros(320, np.float32), 16000)
            await asyncio.sleep(0.02)
        assert session.closed
        errors = []
        async for event in events:
            if event.type == "error":
                errors.append(event.message)
        assert any("engine core process has gone" in m for m in errors), errors
        await asyncio.wait_for(agent.aclose(), 10)

    asyncio.run(main())


def test_a_core_whose_models_fail_to_load_reports_the_error():
    from duplex.errors import ConfigError

    async def main():
        config = AgentConfig(profile="fake", device="cpu", engine_core="process")
        config.fake = {"llm": {"no_such_option": 1}}
        with pytest.raises(ConfigError):
            await Agent.load(config)

    asyncio.run(main())
