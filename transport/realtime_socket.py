"""``GET /v1/realtime``: the OpenAI Realtime protocol over a WebSocket, for audio conversations.

A client that speaks the Realtime API (the ``openai`` package's ``client.realtime.connect()``, pointed
at ``http://HOST:PORT/v1``, unchanged) holds a spoken conversation with the agent: it streams the
user's audio in (``input_audio_buffer.append``, 16-bit PCM at 24 kHz, base64) and gets the agent's
voice back as ``response.output_audio.delta`` events, paced in real time, with the events of the
session in the protocol's names (the GA API's; see :data:`SUPPORTED_CLIENT_EVENTS` and
:func:`server_events`). Turn detection is always the agent's own (server-side, full duplex: VAD,
ASR, end-of-turn estimate, barge-in); what the protocol can ask for and duplex does not do is
answered with an ``error`` event naming it, and the connection goes on.

``session.update`` may set the instructions (the session's system prompt) and tools the client runs:
a reply that calls one sends ``response.function_call_arguments.done`` and waits for the client's
``conversation.item.create`` of a ``function_call_output`` with that ``call_id``; the reply then goes on
from it by itself (the ``response.create`` the protocol sends after an output is taken as that).

The input clock: the session's sense of time is the audio it receives, so a client that stops
sending while nobody speaks (many send only speech) is padded with silence up to real time, less
:data:`INPUT_SLACK_S` of network jitter.

At a barge-in the client is told at once (``output_audio_buffer.cleared``: drop what you have not
played), and when the reply is cut ``conversation.item.truncated`` carries the position heard, in
``audio_end_ms``; the conversation record keeps only the words heard.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any

import numpy as np

from duplex import events as ev
from duplex.audio import StreamResampler
from duplex.errors import ConfigError
from duplex.session import Session
from duplex.tools import Tool, current_call, tool_table
from duplex.transport.realtime import RealtimeEncoder

log = logging.getLogger(__name__)

RATE = 24_000  # the protocol's PCM rate, both ways
INPUT_SLACK_S = 0.2  # input may lag real time by this much before silence fills the gap
TICK_S = 0.02
MAX_MESSAGE = 1 << 20  # bytes per client message (an append of ~20 s of audio)

SUPPORTED_CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "conversation.item.truncate",
                           "conversation.item.create", "response.create")
CLIENT_TOOL_TIMEOUT_S = 30.0  # a tool the client runs: how long a reply waits for its output

# data-channel names (transport.realtime, the Realtime beta's) -> the GA protocol's
_RENAMED = {"response.audio_transcript.delta": "response.output_audio_transcript.delta"}
_DROPPED = {"response.audio.words", "response.audio.progress", "agent.state", "agent.metric",
            "agent.end_of_turn_estimate", "agent.resumed", "agent.interrupted", "agent.barge_in",
            "output_audio_buffer.started"}


def session_object(session_id: str, output_rate: int, instructions: str,
                   tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What ``session.created``/``session.updated`` describe: the configuration served, with the
    session's instructions and the tools the client runs."""
    return {"id": session_id, "object": "realtime.session", "type": "realtime", "model": "duplex",
            "output_modalities": ["audio"], "instructions": instructions,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                "turn_detection": {"type": "server_vad", "create_response": True,
                                                   "interrupt_response": True},
                                "transcription": {"model": "duplex-asr"}},
                      "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "duplex"}},
            "tools": list(tools or []), "tool_choice": "auto", "duplex": {"agent_output_rate": output_rate}}


def _unsupported_session_fields(update: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields of a ``session.update`` that ask for something other than what is served."""
    wrong: list[str] = []

    def walk(asked: Any, have: Any, path: str) -> None:
        if isinstance(asked, dict) and isinstance(have, dict):
            for key, value in asked.items():
                walk(value, have.get(key), f"{path}.{key}" if path else key)
        elif asked != have and path not in ("type", "model", "output_modalities", "audio.output.voice"):
            wrong.append(path)

    walk(update, current, "")
    return wrong


def server_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The protocol's server events for one data-channel message (none for ours it has no use for)."""
    kind = message["type"]
    if kind in _DROPPED:
        return []
    base = {"type": _RENAMED.get(kind, kind), "event_id": message["event_id"]}
    if kind == "response.created":
        return [{**base, "response": {"id": message["response_id"], "object": "realtime.response",
                                      "status": "in_progress", "output": [], "output_modalities": ["audio"]}}]
    if kind == "response.audio_transcript.delta":
        return [{**base, "response_id": message["response_id"], "item_id": _item(message["response_id"]),
                 "output_index": 0, "content_index": 0, "delta": message["delta"]}]
    if kind == "response.done":
        rid = message["response_id"]
        cancelled = message["status"] == "cancelled"
        item = {"id": _item(rid), "object": "realtime.item", "type": "message", "role": "assistant",
                "status": "incomplete" if cancelled else "completed",
                "content": [{"type": "output_audio", "transcript": message["heard"]}]}
        done = [{"type": "response.output_audio.done", "event_id": f"{base['event_id']}a", "response_id": rid,
                 "item_id": _item(rid), "output_index": 0, "content_index": 0},
                {"type": "response.output_audio_transcript.done", "event_id": f"{base['event_id']}b",
                 "response_id": rid, "item_id": _item(rid), "output_index": 0, "content_index": 0,
                 "transcript": message["heard"]}]
        return [*done, {**base, "response": {
            "id": rid, "object": "realtime.response", "status": message["status"], "output": [item],
            "status_details": {"type": "cancelled", "reason": "turn_detected"} if cancelled else None}}]
    if kind == "conversation.item.input_audio_transcription.delta":
        return []  # our partials revise their tail; the protocol's deltas only append (see _stable_delta)
    if kind == "conversation.item.input_audio_transcription.completed":
        return [{**base, "item_id": message["item_id"], "content_index": 0, "transcript": message["transcript"]}]
    if kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"):
        keep = ("item_id", "audio_start_ms") if kind.endswith("started") else ("item_id", "audio_end_ms")
        return [{**base, **{k: message[k] for k in keep}}]
    if kind == "input_audio_buffer.committed":
        return [{**base, "item_id": message["item_id"], "previous_item_id": None}]
    if kind == "error":
        error = message["error"]
        return [{**base, "error": {"type": error["type"], "code": error.get("stage"), "message": error["message"],
                                   "param": None, "event_id": None}}]
    return [{**base, **{k: v for k, v in message.items() if k not in ("type", "event_id", "t", "stream_s")}}]


def _item(response_id: str) -> str:
    return f"item_{response_id}"


def decode_append(message: dict[str, Any]) -> np.ndarray:
    """The PCM of an ``input_audio_buffer.append`` (int16 samples); ValueError naming what is wrong."""
    audio = message.get("audio")
    if not isinstance(audio, str):
        raise ValueError("input_audio_buffer.append needs 'audio': base64 of 16-bit little-endian PCM at 24 kHz")
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("input_audio_buffer.append: 'audio' is not valid base64") from None
    if len(raw) % 2:
        raise ValueError(f"input_audio_buffer.append: {len(raw)} bytes is not whole 16-bit samples")
    return np.frombuffer(raw, "<i2")


class RealtimeSocket:
    """One client's conversation over the WebSocket: its session, and the tasks that feed it and
    forward what it says. Created by the server once the token, origin and seat checks passed."""

    def __init__(self, socket_id: str, ws: Any, session: Session,
                 on_closed: Callable[[RealtimeSocket], object]) -> None:
        self.id = socket_id
        self.ws = ws
        self.session = session
        self._on_closed = on_closed
        self._encoder = RealtimeEncoder(session.t0, session.output_rate)
        self._out = StreamResampler(session.output_rate, RATE)
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._received_s = 0.0  # input seconds received or padded
        self._speaking: str | None = None  # the response whose audio is being sent
        self._stable: dict[str, str] = {}  # item id -> the part of its transcript sent as deltas
        self._client_tools: dict[str, dict[str, Any]] = {}  # name -> the spec the client gave (it runs them)
        self._outputs: dict[str, asyncio.Future[str]] = {}  # call id -> its output, sent by the client
        self._creates = 0  # response.create events the protocol sends after outputs (the reply goes on)
        self._ids = 0
        self.closed = False
        self.reason = ""
        self.sent = 0

    def _event_id(self) -> str:
        self._ids += 1
        return f"evt_srv_{self._ids}"

    async def send(self, event: dict[str, Any]) -> None:
        if self.closed or self.ws.closed:
            return
        await self.ws.send_str(json.dumps(event))
        self.sent += 1

    async def error(self, message: str, *, code: str = "unsupported", param: str | None = None,
                    client_event: str | None = None) -> None:
        await self.send({"type": "error", "event_id": self._event_id(), "error": {
            "type": "invalid_request_error", "code": code, "message": message, "param": param,
            "event_id": client_event}})

    # -- running ---------------------------------------------------------------------------------

    async def run(self) -> str:
        """Serve the client until it or the session ends; returns why it ended."""
        events = self.session.events()
        audio = self.session.audio(live=True)
        await self.send({"type": "session.created", "event_id": self._event_id(),
                         "session": self._session_object()})
        tasks = [asyncio.create_task(self._forward_events(events), name=f"{self.id}-events"),
                 asyncio.create_task(self._forward_audio(audio), name=f"{self.id}-audio"),
                 asyncio.create_task(self._keep_time(), name=f"{self.id}-clock")]
        try:
            self.reason = await self._receive()
        except (ConnectionError, RuntimeError) as exc:  # the socket broke under a send, or the session closed
            self.reason = f"{type(exc).__name__}: {exc}"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.close(self.reason or "closed")
        return self.reason

    def _session_object(self) -> dict[str, Any]:
        return session_object(self.id, self.session.output_rate, self.session.conversation.system_prompt,
                              list(self._client_tools.values()))

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.reason = self.reason or reason
        with contextlib.suppress(Exception):
            await self.ws.close()
        await self.session.close()
        self._on_closed(self)

    async def _receive(self) -> str:
        from aiohttp import WSMsgType

        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self._handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await self.error("send client events as JSON text messages", code="invalid_message")
            elif msg.type == WSMsgType.ERROR:
                return f"websocket error: {self.ws.exception()}"
            if self.session.closed:
                return "the session ended"
        return "the client closed the connection"

    async def _handle(self, text: str) -> None:
        try:
            message = json.loads(text)
        except json.JSONDecodeError as exc:
            await self.error(f"not JSON: {exc}", code="invalid_json")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.error("a client event is a JSON object with a 'type'", code="invalid_event")
            return
        kind, event_id = message["type"], message.get("event_id")
        if kind == "input_audio_buffer.append":
            try:
                pcm = decode_append(message)
            except ValueError as exc:
                await self.error(str(exc), code="invalid_audio", param="audio", client_event=event_id)
                return
            if pcm.size and not self.session.closed:
                self.session.push_audio(pcm, RATE)
                self._received_s += pcm.size / RATE
        elif kind == "session.update":
            update = message.get("session")
            if isinstance(update, dict):
                rest = await self._update(dict(update), event_id)
                wrong = _unsupported_session_fields(rest, self._session_object())
            else:
                wrong = ["session"]
            if wrong:
                await self.error(f"session.update asks for what this server does not do: {', '.join(wrong)} (it "
                                 "serves pcm16 at 24 kHz both ways and its own full-duplex turn detection); the "
                                 "rest is unchanged", param=wrong[0], client_event=event_id)
            await self.send({"type": "session.updated", "event_id": self._event_id(),
                             "session": self._session_object()})
        elif kind == "conversation.item.create":
            await self._item_create(message, event_id)
        elif kind == "response.create" and self._creates:
            self._creates -= 1  # after a function output: the reply that called it goes on by itself
        elif kind == "conversation.item.truncate":
            # the record is cut at what the session played; say where that was
            await self.send({"type": "conversation.item.truncated", "event_id": self._event_id(),
                             "item_id": message.get("item_id"), "content_index": message.get("content_index", 0),
                             "audio_end_ms": message.get("audio_end_ms")})
        else:
            await self.error(f"{kind} is not supported by duplex's Realtime endpoint (it supports "
                             f"{', '.join(SUPPORTED_CLIENT_EVENTS)}; turns and responses follow the agent's own "
                             "turn detection)", client_event=event_id)

    # -- instructions and the client's tools --------------------------------------------------------

    async def _update(self, update: dict[str, Any], event_id: str | None) -> dict[str, Any]:
        """Take up a ``session.update``'s instructions and tools (those the client runs: a call is sent
        as ``response.function_call_arguments.done``, and the reply waits for the client's
        ``function_call_output`` item); returns the rest of ``update``, to be checked against what is served."""
        instructions, tools = update.pop("instructions", None), update.pop("tools", None)
        if update.get("tool_choice", "auto") == "auto":  # the model decides: the one choice served
            update.pop("tool_choice", None)
        if instructions is not None and not isinstance(instructions, str):
            await self.error("session.update: instructions must be a string", code="invalid_value",
                             param="instructions", client_event=event_id)
            instructions = None
        made: list[Tool] | None = None
        if tools is not None:
            try:
                made = self._client_tool_list(tools)
            except (ConfigError, ValueError) as exc:
                await self.error(f"session.update: tools: {exc}; the tools are unchanged", code="invalid_value",
                                 param="tools", client_event=event_id)
        if instructions is None and made is None:
            return update
        own = self._server_tools()
        theirs = [t for t in self.session.tools.values() if t.name in self._client_tools]
        try:
            await self.session.configure(instructions=instructions, tools=[*own, *(made if made is not None else theirs)])
        except (ConfigError, RuntimeError) as exc:  # a closed session, a name the server's tools have
            await self.error(f"session.update could not be applied: {exc}", code="invalid_value", client_event=event_id)
            return update
        if made is not None:
            self._client_tools = {t.name: spec for t, spec in zip(made, tools)}
        return update

    def _server_tools(self) -> list[Tool]:
        """The session's tools that are the server's own (``--tools``), not the client's."""
        return [t for t in self.session.tools.values() if t.name not in self._client_tools]

    def _client_tool_list(self, specs: Any) -> list[Tool]:
        """Tools the client runs, from the protocol's function specs; ValueError naming what is wrong."""
        if not isinstance(specs, list):
            raise ValueError("give a list of {type: function, name, description, parameters}")
        if specs and not self.session.calls_tools:
            raise ValueError("this agent's LLM does not call tools (duplex reads the tool formats of Qwen2.5's "
                             "and Llama 3.1's chat templates; the fake profile's scripted LLM calls them too)")
        own = {t.name for t in self._server_tools()}
        out = []
        for spec in specs:
            if not isinstance(spec, dict) or spec.get("type", "function") != "function" \
                    or not isinstance(spec.get("name"), str):
                raise ValueError(f"a tool is {{type: function, name, description, parameters}}, got {spec!r:.200}")
            if spec["name"] in own:
                raise ValueError(f"{spec['name']!r} is a tool of the server's own (--tools); name yours otherwise")
            parameters = spec.get("parameters") or {"type": "object", "properties": {}}
            out.append(Tool(name=spec["name"], description=str(spec.get("description", "")),
                            parameters=parameters, fn=self._ask_client, timeout_s=CLIENT_TOOL_TIMEOUT_S))
        tool_table(out)  # (ConfigError when two share a name)
        return out

    async def _ask_client(self, **arguments: Any) -> str:
        """A client's tool: the call went out as response.function_call_arguments.done; its output
        comes back as a function_call_output item with the call's id."""
        call = current_call()
        future: asyncio.Future[str] = self._loop.create_future()
        self._outputs[call.call_id] = future
        try:
            return await future
        finally:
            self._outputs.pop(call.call_id, None)

    async def _item_create(self, message: dict[str, Any], event_id: str | None) -> None:
        item = message.get("item")
        if not isinstance(item, dict) or item.get("type") != "function_call_output":
            await self.error("conversation.item.create takes only function_call_output items here (the output "
                             "of a tool this client runs); the conversation is spoken", client_event=event_id)
            return
        call_id, output = item.get("call_id"), item.get("output")
        future = self._outputs.get(call_id) if isinstance(call_id, str) else None
        if future is None or future.done():
            await self.error(f"no tool call {call_id!r} is waiting for its output (a barge-in cancelled it, it "
                             f"timed out after {CLIENT_TOOL_TIMEOUT_S:g} s, or it was answered)", code="unknown_call",
                             param="item.call_id", client_event=event_id)
            return
        future.set_result(output if isinstance(output, str) else json.dumps(output))
        self._creates += 1

    async def _keep_time(self) -> None:
        """Silence for a client that stopped sending: the session's clock is the audio it receives."""
        block = int(TICK_S * RATE)
        while True:
            await asyncio.sleep(TICK_S)
            behind = self._loop.time() - self._start - INPUT_SLACK_S - self._received_s
            if behind >= TICK_S and not self.session.closed:
                n = int(behind / TICK_S) * block
                self.session.push_audio(np.zeros(n, np.int16), RATE)
                self._received_s += n / RATE

    async def _forward_events(self, events: Any) -> None:
        async for event in events:
            if isinstance(event, ev.BargeIn):
                await self.send({"type": "output_audio_buffer.cleared", "event_id": self._event_id(),
                                 "response_id": f"resp_{event.reply_id}"})
            elif isinstance(event, ev.Interrupted):
                rid = f"resp_{event.reply_id}"
                await self.send({"type": "conversation.item.truncated", "event_id": self._event_id(),
                                 "item_id": _item(rid), "content_index": 0,
                                 "audio_end_ms": int(round(1000 * event.played / self.session.output_rate))})
            elif isinstance(event, ev.TranscriptPartial):
                await self._stable_delta(event)
            if isinstance(event, ev.ReplyStarted):
                self._speaking = f"resp_{event.reply_id}"
            message = self._encoder.encode(event)
            if message is not None:
                for out in server_events(message):
                    await self.send(out)
            if isinstance(event, ev.Error) and event.fatal:
                await self.close(f"the session failed: {event.message}")

    async def _stable_delta(self, event: ev.TranscriptPartial) -> None:
        """The protocol's transcription deltas only append: send the part of a partial that will not
        change (its ``stable`` words) as it grows."""
        item = self._encoder.user_item
        sent = self._stable.get(item, "")
        if event.stable.startswith(sent) and len(event.stable) > len(sent):
            self._stable[item] = event.stable
            await self.send({"type": "conversation.item.input_audio_transcription.delta",
                             "event_id": self._event_id(), "item_id": item, "content_index": 0,
                             "delta": event.stable[len(sent):]})

    async def _forward_audio(self, frames: Any) -> None:
        """The agent's voice as it plays (real-time paced by the session); silence is not sent."""
        async for frame in frames:
            if self._speaking is None or not frame.any():
                continue
            pcm = self._out(frame)
            data = (np.clip(pcm, -1.0, 1.0) * 32767).round().astype("<i2").tobytes()
            await self.send({"type": "response.output_audio.delta", "event_id": self._event_id(),
                             "response_id": self._speaking, "item_id": _item(self._speaking),
                             "output_index": 0, "content_index": 0, "delta": base64.b64encode(data).decode()})


def new_socket_id() -> str:
    return f"rt_{secrets.token_hex(8)}"
