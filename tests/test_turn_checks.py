"""A backchannel check that does not answer: the session reports it and yields at once, never
holding the agent paused under the user's words for ``turn.max_pause_s`` (virtual clock, real Silero
VAD on JFK's speech, scripted ASR/LLM/TTS)."""

from __future__ import annotations

import asyncio

import numpy as np

from duplex import events as ev
from duplex.clock import run_virtual
from tests.fake_agent import clip, drive, make_agent, silence

REPLY = "one two three four five six seven eight nine ten"


def _check_yields(vad_model, jfk16, check, message: str):
    """The user says "yeah" over the reply and the backchannel check is ``check``: the session reports
    ``message`` as an error and yields (interrupted, never resumed) within a second of the barge-in on
    the virtual clock, not after max_pause_s (3 s); the words are a turn."""
    agent = make_agent(vad_model, asr={"utterances": ["hello there", "yeah"]}, llm={"replies": [REPLY, "sure"]})
    agent.stages.llm.is_backchannel_override = check
    pcm = np.concatenate([clip(jfk16, 0.2, 2.4), silence(2.8), clip(jfk16, 3.25, 3.9), silence(4.0)])
    run = run_virtual(drive(agent, pcm))
    barge, = run.of(ev.BargeIn)
    interrupted, = run.of(ev.Interrupted)
    assert not run.of(ev.Resumed)
    assert any(message in e.message for e in run.of(ev.Error))
    assert interrupted.wall - barge.wall < 1.0
    assert [t["text"] for t in run.conversation["turns"] if t["role"] == "user"] == ["hello there", "yeah"]
    return run


def test_a_hung_backchannel_check_yields_after_its_timeout(vad_model, jfk16):
    """A backchannel check that never answers does not hold the agent paused for max_pause_s: after
    turn.check_timeout_s the session reports it and yields (the reply stops, the words are a turn)."""
    async def hung(messages, text):
        await asyncio.sleep(60)
        return True

    _check_yields(vad_model, jfk16, hung, "no answer within 0.5 s")


def test_a_check_cancelled_under_the_session_is_a_failed_check(vad_model, jfk16):
    """The call is cancelled beneath the check (an engine or the engine core dropped it), not the
    session's task: that is an error event and the agent yields within the check's timeout; before,
    the cancellation ended the check without a verdict and the agent stayed paused for max_pause_s
    (3 s). The session goes on: the words are a turn and get their reply."""
    async def cancelled(messages, text):
        await asyncio.sleep(0.05)
        raise asyncio.CancelledError

    run = _check_yields(vad_model, jfk16, cancelled, "backchannel check failed: the call was cancelled")
    assert len(run.of(ev.AudioOut)) == 2
