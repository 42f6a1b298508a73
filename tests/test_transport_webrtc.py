"""The WebRTC server with real aiortc peers over loopback: speech in, agent voice and events out.

The models are those of ``tests.transport_fixtures.PROFILE``; the client is a real aiortc peer
connection talking to the server through HTTP signalling and ICE/DTLS/SRTP/SCTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tests.transport_fixtures import connect, file_track, jfk48, load_agent, running_server

pytestmark = pytest.mark.slow


async def test_peer_talks_to_the_agent_over_webrtc(jfk_path):
    """A peer sending JFK's speech as its microphone gets, over one real WebRTC connection: the
    user's transcript and turn, a reply with its latency, the agent's voice as 20 ms frames at 48 kHz
    (audible while the agent speaks, silent around it), and the server's session hears the speech."""
    agent = await load_agent()
    try:
        async with running_server(agent) as (server, url):
            client = await connect(url, file_track(jfk48(jfk_path)))
            try:
                await client.wait_for("input_audio_buffer.speech_started", timeout=15)
                await client.wait_for("conversation.item.input_audio_transcription.delta", timeout=15)
                await client.wait_for("input_audio_buffer.committed", timeout=20)
                started, = (await client.wait_for("output_audio_buffer.started", timeout=20))[:1]
                await client.wait_for("response.done", timeout=20)
                peer = server.peers[client.pc_id]
                assert peer.input.peak_rms > 0.05  # the server really heard speech
                assert "48000" in peer.input.layout
            finally:
                await client.close()
            await asyncio.sleep(0.3)
            assert not server.peers  # the hang-up closed the server side too
    finally:
        await agent.aclose()

    kinds = [m["type"] for m in client.messages]
    assert kinds[0] == "session.created"
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.committed") \
        < kinds.index("response.created") < kinds.index("output_audio_buffer.started") < kinds.index("response.done")
    deltas = client.of("conversation.item.input_audio_transcription.delta")
    assert deltas[-1]["text"]
    done = client.of("response.done")[0]
    assert done["transcript"] and done["response_id"] == started["response_id"]
    assert "".join(m["delta"] for m in client.of("response.audio_transcript.delta")
                   if m["response_id"] == done["response_id"]) == done["transcript"]
    metrics = {m["name"]: m["value"] for m in client.of("agent.metric") if m["response_id"] == done["response_id"]}
    assert 0 < metrics["voice_to_voice_s"] < 5
    assert {"listening", "thinking", "speaking"} <= {m["state"] for m in client.of("agent.state")}

    # Agent audio: 48 kHz frames of 20 ms, silence before the reply, the beeps of the reply.
    assert client.frame_layouts and all(layout.endswith(" 48000") for layout in client.frame_layouts)
    assert {len(f) for f in client.frames} == {960}
    audio = client.audio()
    level = np.sqrt(np.convolve(audio ** 2, np.ones(960) / 960, mode="valid"))
    assert level.max() > 0.1  # the fake TTS beeps at 0.3 amplitude
    assert level[:48_000].max() < 0.01  # nothing before the user had said anything


async def test_trickle_ice_by_patch(jfk_path):
    """An offer without candidates connects once its candidates arrive by PATCH (Pipecat's shape)."""
    agent = await load_agent()
    try:
        async with running_server(agent) as (server, url):
            client = await connect(url, file_track(jfk48(jfk_path)), trickle=True)
            try:
                await client.wait_for("input_audio_buffer.speech_started", timeout=15)
                assert server.peers[client.pc_id].pc.connectionState == "connected"
            finally:
                await client.close()
    finally:
        await agent.aclose()
