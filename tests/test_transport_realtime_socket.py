"""``/v1/realtime``: the official ``openai`` package's Realtime client, unchanged, talks to
``duplex serve`` over a WebSocket: the user's speech in, the agent's voice out, a barge-in, and the
refusals (token, foreign origin, unsupported requests) as the protocol's errors."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest

from duplex.audio import read_audio, resample
from tests.transport_fixtures import load_agent, running_server

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai", minversion="1.107", reason="the Realtime client of the openai package")
RATE = 24_000
LONG_REPLY = " ".join(["word"] * 24)  # six seconds of beeps: time to talk over it


def pcm16(pcm: np.ndarray) -> str:
    return base64.b64encode((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()).decode()


async def stream(conn, pcm: np.ndarray) -> None:
    """Send ``pcm`` (24 kHz) in real time, 20 ms at a time, as a microphone would."""
    block = RATE // 50
    loop = asyncio.get_running_loop()
    start = loop.time()
    for k, i in enumerate(range(0, len(pcm), block)):
        await conn.input_audio_buffer.append(audio=pcm16(pcm[i:i + block]))
        await asyncio.sleep(max(0.0, start + (k + 1) * 0.02 - loop.time()))


async def test_the_openai_realtime_client_converses_and_is_interrupted(jfk_path):
    """The openai client streams JFK's words, then nothing (the server pads silence up to real time,
    so the agent's turn detection still sees the end of speech); it receives the transcript, a
    response whose audio arrives as pcm16 deltas with its transcript, and response.done. Then it
    talks over a long reply: the server says output_audio_buffer.cleared, truncates the item at the
    position played and ends the response as cancelled with only the words heard. An unsupported
    session.update is an error event, and the connection goes on."""
    speech, rate = read_audio(jfk_path)
    speech = resample(speech, rate, RATE)
    first, second = speech[int(0.2 * RATE):int(2.4 * RATE)], speech[int(5.3 * RATE):int(7.8 * RATE)]
    agent = await load_agent(llm={"replies": ["and so my friends", LONG_REPLY]})
    received: list = []
    try:
        async with running_server(agent) as (server, url):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
            async with client.realtime.connect(model="duplex") as conn:

                async def until(kind: str, timeout: float = 20.0, after: int = 0):
                    deadline = asyncio.get_running_loop().time() + timeout
                    while True:
                        for event in received[after:]:
                            if event.type == kind:
                                return event
                        after = len(received)
                        left = deadline - asyncio.get_running_loop().time()
                        if left <= 0:
                            raise AssertionError(f"no {kind} in {timeout} s; got {[e.type for e in received]}")
                        try:
                            received.append(await asyncio.wait_for(conn.recv(), left))
                        except asyncio.TimeoutError:
                            raise AssertionError(f"no {kind} in {timeout} s; got {[e.type for e in received]}") from None

                created = await until("session.created")
                assert created.session.audio.input.format.rate == RATE
                await conn.session.update(session={"type": "realtime", "audio": {
                    "input": {"format": {"type": "audio/pcm", "rate": RATE}}}})
                await until("session.updated")
                mark = len(received)
                await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
                error = await until("error", after=mark)
                assert "turn_detection" in error.error.message
                await until("session.updated", after=mark)
                assert server.room() == server.options.max_sessions - 1

                await stream(conn, first)
                started = await until("input_audio_buffer.speech_started")
                await until("input_audio_buffer.speech_stopped")
                heard = await until("conversation.item.input_audio_transcription.completed")
                assert heard.transcript and heard.item_id == started.item_id
                response = await until("response.created")
                delta = await until("response.output_audio.delta")
                assert delta.response_id == response.response.id
                done = await until("response.done")
                assert done.response.status == "completed"
                assert done.response.output[0].content[0].transcript == "and so my friends"
                audio = b"".join(base64.b64decode(e.delta) for e in received
                                 if e.type == "response.output_audio.delta" and e.response_id == done.response.id)
                pcm = np.frombuffer(audio, "<i2")
                assert len(pcm) >= 4 * 0.25 * RATE * 0.9 and np.abs(pcm).max() > 3000  # four beeps of 0.25 s
                text = "".join(e.delta for e in received if e.type == "response.output_audio_transcript.delta"
                               and e.response_id == done.response.id)
                assert text.split() == "and so my friends".split()

                # a second turn, then talk over its long reply once it is audible
                mark = len(received)
                await stream(conn, first)
                await until("response.output_audio.delta", after=mark)
                await asyncio.sleep(1.0)
                barge = asyncio.create_task(stream(conn, second))
                cleared = await until("output_audio_buffer.cleared", after=mark)
                truncated = await until("conversation.item.truncated", after=mark)
                cut = await until("response.done", after=mark)
                await barge
                assert cut.response.status == "cancelled" and cleared.response_id == cut.response.id
                words = cut.response.output[0].content[0].transcript.split()
                assert 0 < len(words) < len(LONG_REPLY.split())
                assert 0 < truncated.audio_end_ms < 6000 and truncated.item_id == cut.response.output[0].id
            for _ in range(50):
                if not server.sockets:
                    break
                await asyncio.sleep(0.1)
            assert not server.sockets  # the client's close ended the session
    finally:
        await agent.aclose()


async def test_the_endpoint_refuses_what_it_must(jfk_path):
    """Without the server's token: 401; from another site's page: 403; a plain GET: 400 saying it is
    a WebSocket endpoint; a bad client event or bad audio: an error event, and the connection goes on."""
    import aiohttp

    agent = await load_agent()
    try:
        async with running_server(agent, token="s3cret") as (server, url):
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{url}/v1/realtime") as r:
                    assert r.status == 401
                auth = {"Authorization": "Bearer s3cret"}
                async with http.get(f"{url}/v1/realtime", headers=auth) as r:
                    assert r.status == 400 and "WebSocket" in (await r.json())["error"]
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(f"{url}/v1/realtime", headers={**auth, "Origin": "http://evil.example"})
                assert refused.value.status == 403
                async with http.ws_connect(f"{url}/v1/realtime", headers=auth) as ws:
                    assert json.loads((await ws.receive()).data)["type"] == "session.created"
                    await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": "not base64!"}))
                    await ws.send_str("{not json")
                    await ws.send_str(json.dumps({"type": "response.create"}))
                    errors = [json.loads((await ws.receive(timeout=5)).data) for _ in range(3)]
                    assert [e["error"]["code"] for e in errors] == ["invalid_audio", "invalid_json", "unsupported"]
                    assert "response.create is not supported" in errors[2]["error"]["message"]
                    await ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16(np.zeros(480))}))
                    assert server.sockets and not next(iter(server.sockets.values())).closed
    finally:
        await agent.aclose()


async def test_a_tool_call_reaches_the_openai_client(jfk_path):
    """With a tool registered (``tools`` in the config, as ``--tools`` sets it), a reply that calls it
    shows on the socket as response.function_call_arguments.done, then conversation.item.created of
    type function_call_output, and the reply goes on from the result in its audio transcript."""
    from duplex.agent import Agent
    from tests.transport_fixtures import agent_config

    speech, rate = read_audio(jfk_path)
    first = resample(speech, rate, RATE)[int(0.2 * RATE):int(2.4 * RATE)]
    config = agent_config(llm={"replies": ['Let me look. [[weather {"city": "Paris"}]] It is {result}.']})
    config.tools = ["tests.test_tools:weather"]
    agent = await Agent.load(config)
    received: list = []
    try:
        async with running_server(agent) as (_, url):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
            async with client.realtime.connect(model="duplex") as conn:
                await stream(conn, first)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 20
                while not any(e.type == "response.done" for e in received):
                    assert loop.time() < deadline, [e.type for e in received]
                    received.append(await asyncio.wait_for(conn.recv(), deadline - loop.time()))
        kinds = [e.type for e in received]
        called = received[kinds.index("response.function_call_arguments.done")]
        output = received[kinds.index("conversation.item.created")]
        assert called.name == "weather" and json.loads(called.arguments) == {"city": "Paris"}
        assert output.item.type == "function_call_output" and output.item.call_id == called.call_id
        assert json.loads(output.item.output)["sky"] == "sunny"
        done = received[kinds.index("response.done")]
        assert done.response.output[0].content[0].transcript.startswith("Let me look. It is {")
    finally:
        await agent.aclose()


async def test_instructions_and_tools_the_client_runs(jfk_path):
    """session.update sets the instructions (the LLM's system block and the record) and tools the
    client runs: a reply that calls one sends response.function_call_arguments.done and waits; the
    client's function_call_output item (then response.create, as the protocol has it) lets the reply
    go on from that output. An output for a call nobody waits for, or a tool for an LLM that cannot
    call tools, is an error event, and the connection goes on."""
    speech, rate = read_audio(jfk_path)
    first = resample(speech, rate, RATE)[int(0.2 * RATE):int(2.4 * RATE)]
    agent = await load_agent(llm={"replies": ['Let me look. [[lookup {"city": "Paris"}]] It is {result}.']})
    received: list = []
    spec = {"type": "function", "name": "lookup", "description": "Look up the weather of a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    try:
        async with running_server(agent) as (server, url):
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
            async with client.realtime.connect(model="duplex") as conn:

                async def until(kind: str, timeout: float = 20.0):
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + timeout
                    while True:
                        event = await asyncio.wait_for(conn.recv(), max(0.01, deadline - loop.time()))
                        received.append(event)
                        if event.type == kind:
                            return event

                await until("session.created")
                session = next(iter(server.sockets.values())).session
                session.calls_tools = False  # as with an LLM whose template has no tool format
                await conn.session.update(session={"type": "realtime", "tools": [spec]})
                refused = await until("error")
                assert refused.error.param == "tools" and "does not call tools" in refused.error.message
                assert (await until("session.updated")).session.tools == []
                session.calls_tools = True
                await conn.session.update(session={"type": "realtime", "instructions": "Answer in French.",
                                                   "tools": [spec], "tool_choice": "auto"})
                updated = await until("session.updated")
                assert updated.session.instructions == "Answer in French."
                assert [t.name for t in updated.session.tools] == ["lookup"]
                llm = session._llm
                assert llm.system_prompt == "Answer in French."
                assert [t["function"]["name"] for t in llm.tools] == ["lookup"]
                await conn.send({"type": "conversation.item.create", "item": {
                    "type": "function_call_output", "call_id": "call_nobody", "output": "{}"}})
                assert (await until("error")).error.code == "unknown_call"
                sending = asyncio.create_task(stream(conn, first))
                called = await until("response.function_call_arguments.done")
                assert called.name == "lookup" and json.loads(called.arguments) == {"city": "Paris"}
                await conn.conversation.item.create(item={  # as the README's snippet does
                    "type": "function_call_output", "call_id": called.call_id, "output": '{"sky": "grey"}'})
                await conn.response.create()
                done = await until("response.done")
                await sending
        kinds = [e.type for e in received]
        output = received[kinds.index("conversation.item.created")]
        assert output.item.call_id == called.call_id and output.item.output == '{"sky": "grey"}'
        assert done.response.output[0].content[0].transcript == 'Let me look. It is {"sky": "grey"}.'
        # response.create after the output was no error
        assert [e.error.code for e in received if e.type == "error"] == ["invalid_value", "unknown_call"]
        assert session.conversation.system_prompt == "Answer in French."
    finally:
        await agent.aclose()
