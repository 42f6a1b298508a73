"""The reply handle: one call stops a reply everywhere it lives (LLM decode row, TTS row, playout).

Runs the real tiny LLM and TTS engines on the CPU, so the rows freed are the engines' own."""

from __future__ import annotations

import asyncio
import time

import pytest

from duplex.agent import Agent
from duplex.config import AgentConfig
from duplex.llm.model import SinkLLM
from duplex.turns import EndTurn


async def _until(what: str, cond, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"not reached within {timeout_s} s: {what}")
        await asyncio.sleep(0.01)


def test_one_stop_frees_the_llm_row_the_tts_row_and_the_playout(monkeypatch):
    """A committed reply caught while its LLM is still decoding and its TTS is speaking: after
    ``Reply.stop()`` its audio is gone from the very next frame, and once its task has unwound the
    LLM steps no row for it and the TTS engine holds no row for it; the session then answers the
    next turn as usual (the rows were given back, not leaked)."""
    real_collect = SinkLLM._collect

    def slow_collect(self, *launches):  # the LLM keeps decoding while the TTS speaks (tiny models are fast)
        time.sleep(0.03)
        return real_collect(self, *launches)

    monkeypatch.setattr(SinkLLM, "_collect", slow_collect)

    async def main():
        agent = await Agent.load(AgentConfig(profile="tiny", device="cpu", engine_slots=2, max_reply_tokens=400))
        llm, tts = agent.stages.llm, agent.stages.tts
        session = agent.session()
        try:
            speaking = session.speaking
            speaking.end_turn(EndTurn("hello there, how are you", speech_end=0))
            reply = speaking.current
            assert reply is not None and reply.task is not None
            await _until("the LLM decoding and the TTS speaking",
                         lambda: llm.scheduler.active_rows == 1 and tts.engine.rows.held == 1
                         and speaking.playout.buffered > 0)

            reply.stop()  # the one call
            assert speaking.playout.active is None and speaking.playout.buffered == 0
            assert speaking.playout.next_frame().reply_id is None
            await asyncio.wait([reply.task])
            await _until("the TTS row given back", lambda: tts.engine.rows.held == 0, 10.0)
            assert llm.scheduler.active_rows == 0 and tts.scheduler.active_rows == 0

            # the rows came back: the next reply takes them and speaks
            speaking.stop(heard=True)
            speaking.end_turn(EndTurn("and now", speech_end=0))
            nxt = speaking.current
            assert nxt is not None and nxt is not reply
            await _until("the next reply speaking", lambda: speaking.playout.buffered > 0)
            nxt.stop()
            await asyncio.wait([nxt.task])
        finally:
            await session.close()
            await agent.aclose()

    asyncio.run(main())
