"""Sessions that survive a reconnect: the answer carries a resume token; a new connection that
presents it (once, within the server's resume_ttl_s) continues the same conversation record, and the
LLM's context is rebuilt from it; anything else starts a new conversation and says why."""

from __future__ import annotations

import asyncio

import pytest

from duplex.conversation import Conversation
from duplex.stages import Message
from duplex.transport.resume import ResumableConversations
from tests.transport_fixtures import connect, file_track, jfk48, load_agent, running_server


def _said(text: str) -> Conversation:
    conversation = Conversation("Be brief.")
    conversation.user_turn_ended(text, 0, 16_000, 1.0)
    return conversation


def test_a_token_continues_its_conversation_once_and_only_while_it_is_kept(monkeypatch):
    """take() gives the conversation back once; a wrong token, an expired one, one pushed out by
    newer conversations past the capacity, or a conversation where nothing was said give None."""
    clock = [100.0]
    monkeypatch.setattr("duplex.transport.resume.time.monotonic", lambda: clock[0])
    store = ResumableConversations(ttl_s=300.0, capacity=2)
    first = _said("hello")
    store.keep("tok-1", first)
    assert store.take("tok-2") is None
    assert store.take("tok-1") is first and store.take("tok-1") is None
    store.keep("tok-1", first)
    clock[0] += 301
    assert store.take("tok-1") is None  # too late
    store.keep("tok-1", first)
    store.keep("tok-2", _said("b"))
    store.keep("tok-3", _said("c"))
    assert len(store) == 2 and store.take("tok-1") is None  # the oldest went
    store.keep("tok-4", Conversation("Be brief."))
    assert store.take("tok-4") is None  # nothing was said: nothing to continue


@pytest.mark.slow
async def test_a_reconnecting_client_continues_the_conversation(jfk_path):
    """A client talks one turn and hangs up; a new connection with the answer's resume_token is told
    it resumed, and its first reply is written from the whole dialogue (the first turn and the words
    of the reply that were heard, then the new turn), in one record. The same token again starts a
    new conversation and says why."""
    agent = await load_agent(llm={"replies": ["one two three"]})
    speech = jfk48(jfk_path, tail_s=3.0)[:int(2.4 * 48_000)]
    try:
        async with running_server(agent) as (server, url):
            first = await connect(url, file_track(jfk48(jfk_path, tail_s=3.0)))
            try:
                await first.wait_for("response.done", timeout=30)
                assert first.answer["resumed"] is False and first.answer["resume_token"]
            finally:
                await first.close()
            for _ in range(100):
                if not server.peers and len(server.resumable):
                    break
                await asyncio.sleep(0.1)
            token = first.answer["resume_token"]
            assert len(server.resumable) == 1

            second = await connect(url, file_track(speech), resume=token)
            try:
                assert second.answer["resumed"] is True and second.answer["resume_token"] != token
                await second.wait_for("response.done", timeout=30)
                record = server.peers[second.pc_id].session.conversation
                assert [t.role for t in record.turns][:3] == ["user", "assistant", "user"]
                stream = agent.stages.llm.streams[-1]
                shown = stream.shown[-1]
                assert shown[1] == Message("assistant", "one two three") and shown[0].role == "user"
                assert shown[-1].role == "user" and len(shown) >= 3
            finally:
                await second.close()

            third = await connect(url, file_track(speech), resume=token)
            try:
                assert third.answer["resumed"] is False and "new one has begun" in third.answer["resume_refused"]
            finally:
                await third.close()
    finally:
        await agent.aclose()
