"""The WebRTC server with real aiortc peers over loopback: speech in, agent voice and events out.

The main test runs the models of ``PEER_PROFILE`` (the real stages with tiny random weights), the
others those of ``PROFILE`` (see tests/transport_fixtures.py); the client is a real aiortc peer
connection talking to the server through HTTP signalling and ICE/DTLS/SRTP/SCTP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import wave

import numpy as np
import pytest

from tests.transport_fixtures import PEER_PROFILE, SLOW, connect, file_track, jfk48, load_agent, running_server

pytestmark = pytest.mark.slow


async def test_peer_talks_to_the_agent_over_webrtc(jfk_path, tmp_path):
    """A peer sending JFK's speech as its microphone gets, over one real WebRTC connection: the
    user's transcript and turn, a reply with its text, words and latency, the agent's voice as 20 ms
    frames at 48 kHz (silent until the user has spoken, audible once the agent speaks), and the
    server's session hears the speech. (With the tiny profile the words are babble; the path is real.)
    With --record the session leaves its recording: the speech in the left channel, the reply in the
    right one where the transcript puts the words heard."""
    agent = await load_agent(PEER_PROFILE)
    speech = jfk48(jfk_path, tail_s=8.0)
    speech = np.concatenate([speech[:int(2.4 * 48_000)], speech[-8 * 48_000:]])  # "And so my fellow Americans"
    try:
        async with running_server(agent, record_dir=str(tmp_path)) as (server, url):
            client = await connect(url, file_track(speech))
            try:
                await client.wait_for("input_audio_buffer.speech_started", timeout=15 * SLOW)
                await client.wait_for("conversation.item.input_audio_transcription.delta", timeout=15 * SLOW)
                await client.wait_for("input_audio_buffer.committed", timeout=20 * SLOW)
                started = (await client.wait_for("output_audio_buffer.started", timeout=20 * SLOW))[0]
                await client.wait_for("response.done", timeout=20 * SLOW)
                peer = server.peers[client.pc_id]
                assert peer.input.peak_rms > 0.05  # the server really heard speech
                assert "48000" in peer.input.layout
            finally:
                await client.close()
            for _ in range(100):  # the server's close waits for the session's engines to finish their step
                if not server.peers:
                    break
                await asyncio.sleep(0.1)
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
    assert [w for m in client.of("response.audio.words") if m["response_id"] == done["response_id"]
            for w in m["words"]]
    metrics = {m["name"]: m["value"] for m in client.of("agent.metric") if m["response_id"] == done["response_id"]}
    assert 0 < metrics["voice_to_voice_s"] < 5 * SLOW
    assert {"listening", "thinking", "speaking"} <= {m["state"] for m in client.of("agent.state")}

    # Agent audio: 48 kHz frames of 20 ms, silence before the user had said anything, then the reply.
    assert client.frame_layouts and all(layout.endswith(" 48000") for layout in client.frame_layouts)
    assert {len(f) for f in client.frames} == {960}
    audio = client.audio()
    level = np.sqrt(np.convolve(audio ** 2, np.ones(960) / 960, mode="valid"))
    assert level[:48_000].max() < 0.01
    assert level.max() > 0.02

    folder = tmp_path / client.pc_id
    with wave.open(str(folder / "audio.wav")) as w:
        rate = w.getframerate()
        stereo = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2) / 32767
    assert np.abs(stereo[:, 0]).max() > 0.05  # the user's speech, as the session received it
    transcript = json.loads((folder / "transcript.json").read_text())
    said = [t for t in transcript["turns"] if t["role"] == "assistant"]
    assert [t["role"] for t in transcript["turns"]][0] == "user" and said
    first = said[0]["words"][0]
    assert np.abs(stereo[int(first["start_s"] * rate):int((first["end_s"] + 0.05) * rate), 1]).max() > 0.01


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


async def test_page_messages_renegotiation_and_restart(jfk_path):
    """The page's playout delay report sets the session's output latency (out-of-range values and
    junk on the data channel are ignored); a new offer on the same pc_id renegotiates in place; one
    with restart_pc replaces the connection (new pc_id, old session closed)."""
    import aiohttp
    from aiortc import RTCSessionDescription

    agent = await load_agent()
    try:
        async with running_server(agent) as (server, url):
            client = await connect(url, file_track(jfk48(jfk_path)))
            try:
                await client.wait_for("input_audio_buffer.speech_started", timeout=15)
                peer = server.peers[client.pc_id]
                for junk in ("ping: 1234", "{not json", "x" * 10_000, '{"type": "client.stats", "jitter_buffer_s": 9}',
                             '{"type": "client.stats", "jitter_buffer_s": "0.1"}', "[1, 2]"):
                    client.channel.send(junk)
                await asyncio.sleep(0.3)
                assert peer.session.output_latency_s == 0.0 and not peer.closed
                client.channel.send('{"type": "client.stats", "jitter_buffer_s": 0.045}')
                for _ in range(50):
                    if peer.session.output_latency_s:
                        break
                    await asyncio.sleep(0.02)
                assert 0.045 <= peer.session.output_latency_s < 0.3

                await client.pc.setLocalDescription(await client.pc.createOffer())
                async with aiohttp.ClientSession() as http:
                    body = {"sdp": client.pc.localDescription.sdp, "type": "offer", "pc_id": client.pc_id,
                            "secret": client.secret}
                    async with http.post(f"{url}/api/offer", json=body) as r:
                        assert r.status == 200, await r.text()
                        answer = await r.json()
                assert answer["pc_id"] == client.pc_id and len(server.peers) == 1
                await client.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
                n = len(client.messages)
                for _ in range(300):  # events keep coming over the renegotiated connection
                    if len(client.messages) > n:
                        break
                    await asyncio.sleep(0.05)
                assert len(client.messages) > n and peer.pc.connectionState == "connected"

                fresh = await connect(url, file_track(jfk48(jfk_path)), restart_of=client)
                try:
                    await fresh.wait_for("session.created", timeout=10)
                    assert fresh.pc_id != client.pc_id and list(server.peers) == [fresh.pc_id]
                    assert peer.closed and peer.session.closed and peer.close_reason == "restarted by the peer"
                finally:
                    await fresh.close()
            finally:
                await client.close()
    finally:
        await agent.aclose()


def test_frame_layouts_are_unpacked_by_channel():
    """Decoded frames come as [samples, channels] whatever their layout: packed (interleaved) s16
    stereo as aiortc's Opus decoder gives, planar float stereo, and mono; left and right differ, so
    a wrong de-interleave would show."""
    import av

    from duplex.transport.tracks import frame_to_pcm

    left, right = np.arange(960, dtype=np.int16), -np.arange(960, dtype=np.int16)
    packed = av.AudioFrame.from_ndarray(np.stack([left, right], axis=1).reshape(1, -1), format="s16", layout="stereo")
    planar = av.AudioFrame.from_ndarray(np.stack([left, right]).astype(np.float32) / 32768, format="fltp",
                                        layout="stereo")
    mono = av.AudioFrame.from_ndarray(left[None, :], format="s16", layout="mono")
    for frame in (packed, planar, mono):
        frame.sample_rate = 48_000
    pcm, rate = frame_to_pcm(packed)
    assert rate == 48_000 and pcm.shape == (960, 2) and (pcm[:, 0] == left).all() and (pcm[:, 1] == right).all()
    pcm, _ = frame_to_pcm(planar)
    assert pcm.shape == (960, 2) and np.allclose(pcm[:, 1] * 32768, right)
    pcm, _ = frame_to_pcm(mono)
    assert pcm.shape == (960, 1) and (pcm[:, 0] == left).all()
