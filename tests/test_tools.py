"""Tool calls while the agent speaks (duplex.tools), with the real VAD and scripted ASR/LLM/TTS on the
virtual clock: the reply speaks what it said before the call, runs the tool, goes on from its result;
a slow tool gets one holding phrase; a barge-in cancels the tool or lets it finish unspoken, per the
tool; failures and bad arguments are told to the model once and the session goes on; the record and
the events carry every call."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import numpy as np
import pytest

from duplex import events as ev
from duplex.clock import run_virtual
from duplex.errors import ConfigError
from duplex.stages import Message
from duplex.tools import Tool, check_arguments, load_tools, tool
from tests.fake_agent import clip, drive, make_agent, silence

CALLS: list[tuple[str, dict]] = []


@tool
async def weather(city: str, unit: Literal["C", "F"] = "C") -> dict:
    """The current weather in a city.

    (Only this first paragraph is the description.)"""
    CALLS.append(("weather", {"city": city, "unit": unit}))
    return {"city": city, "sky": "sunny"}


def _one_turn(vad_model, jfk16, reply: str, tools, *, barge: bool = False):
    """The user asks; the agent answers ``reply`` (then "okay" to whatever comes next)."""
    agent = make_agent(vad_model, asr={"utterances": ["what is the weather", "stop please"]},
                       llm={"replies": [reply, "okay"]}, tools=tools)
    parts = [clip(jfk16, 0.2, 2.4), silence(2.6)]
    if barge:
        parts += [clip(jfk16, 5.3, 7.8)]
    parts += [silence(6.0)]
    run = run_virtual(drive(agent, np.concatenate(parts)))
    return agent, run


def test_a_tool_is_made_from_a_typed_async_function_and_checks_its_arguments():
    """The decorator names the tool, takes the docstring's first paragraph and writes the JSON
    schema of the typed parameters (those without a default required); arguments that do not fit
    are refused with what is wrong; what cannot be described is refused at once."""
    assert weather.name == "weather" and weather.description == "The current weather in a city."
    assert weather.parameters == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["C", "F"]}}}
    assert weather.schema()["function"]["name"] == "weather"
    assert check_arguments(weather, {"city": "Paris"}) == {"city": "Paris"}
    for bad, why in (({}, "needs city"), ({"city": 5}, "must be a string"), ({"city": "x", "unit": "K"}, "one of"),
                     ({"city": "x", "when": 1}, "takes no argument when"), ("city=Paris", "not a JSON object")):
        with pytest.raises(ValueError, match=why):
            check_arguments(weather, bad)

    def plain(city: str) -> str:
        """Not async."""
        return city

    async def undocumented(city: str) -> str:
        return city

    async def untyped(city) -> str:
        """No type."""
        return city

    for fn, why in ((plain, "must be async"), (undocumented, "docstring"), (untyped, "type annotation")):
        with pytest.raises(ConfigError, match=why):
            tool(fn)


def test_tools_load_from_module_attribute_specs(vad_model):
    """``--tools module:attr`` takes a Tool, an async function or a list of them, and an agent built
    on that config has them; a bad spec says why."""
    assert [t.name for t in load_tools(["tests.test_tools:weather"])] == ["weather"]
    from duplex.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(
        ["serve", "--profile", "fake", "--device", "cpu", "--tools", "tests.test_tools:weather"]))
    assert config.tools == ["tests.test_tools:weather"]
    from duplex.agent import Agent

    assert list(Agent(make_agent(vad_model).stages, config).tools) == ["weather"]
    for spec, why in (("tests.test_tools", "module:attribute"), ("no_such_module_x:T", "cannot import"),
                      ("tests.test_tools:nothing", "has no 'nothing'")):
        with pytest.raises(ConfigError, match=why):
            load_tools([spec])


def test_the_reply_speaks_calls_the_tool_and_goes_on_from_its_result(vad_model, jfk16):
    """"Let me look." is spoken, the tool runs with the model's arguments, and the reply goes on
    with its result; the events, the record and the next LLM context carry the call and its output
    where it came in the reply."""
    CALLS.clear()
    reply = 'Let me look. [[weather {"city": "Paris"}]] It is {result} now.'
    agent, run = _one_turn(vad_model, jfk16, reply, [weather])
    called, = run.of(ev.ToolCalled)
    result, = run.of(ev.ToolResult)
    done = run.of(ev.ReplyDone)[0]
    assert CALLS == [("weather", {"city": "Paris", "unit": "C"})]
    assert json.loads(called.arguments) == {"city": "Paris"} and called.name == "weather"
    assert result.call_id == called.call_id and result.spoken and result.error is None
    output = json.dumps({"city": "Paris", "sky": "sunny"})
    assert result.output == output
    assert not done.interrupted and done.heard == f"Let me look. It is {output} now."
    assert called.wall <= result.wall < [e for e in run.of(ev.ReplyText) if "It" in e.delta][0].wall
    turn = [t for t in run.conversation["turns"] if t["role"] == "assistant"][0]
    assert turn["tools"][0]["name"] == "weather" and turn["tools"][0]["spoken"]
    stream = agent.stages.llm.streams[0]
    asked = stream.shown[-1]  # the continuation's call: the dialogue, what was said with the call, its output
    assert asked[-2].content == "Let me look." and asked[-2].tool_call is not None
    assert asked[-2].tool_call.name == "weather" and asked[-2].tool_call.call_id == called.call_id
    assert asked[-1] == Message("tool", output)


def test_a_slow_tool_gets_one_holding_phrase(vad_model, jfk16):
    """A tool that takes 2.5 s (tool_hold_s is 1 s): "One moment." is said once while it runs."""
    async def lookup(query: str) -> str:
        """Look something up."""
        await asyncio.sleep(2.5)
        return "forty two"

    agent, run = _one_turn(vad_model, jfk16, 'Let me see. [[lookup {"query": "answer"}]] It is {result}.',
                           [tool(lookup)])
    done = run.of(ev.ReplyDone)[0]
    assert done.heard == "Let me see. One moment. It is forty two."
    result, = run.of(ev.ToolResult)
    assert result.seconds == pytest.approx(2.5, abs=0.05)


@pytest.mark.parametrize("cancel", [True, False])
def test_a_barge_in_during_a_tool_cancels_it_or_lets_it_finish_unspoken(vad_model, jfk16, cancel):
    """The user talks over the agent while its tool runs: a tool with cancel_on_interrupt is
    cancelled; one without finishes, and its result is recorded as never spoken. Either way the reply
    ends interrupted, and the next context holds only the words heard."""
    state = {"cancelled": False, "finished": False}

    async def book(time: str) -> str:
        """Book a table."""
        try:
            await asyncio.sleep(4.0)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        state["finished"] = True
        return "booked"

    t = tool(book, cancel_on_interrupt=cancel)
    agent, run = _one_turn(vad_model, jfk16, 'Let me book that table for you right now. [[book {"time": "8"}]] '
                           'Done, it is {result}.', [t], barge=True)
    assert run.of(ev.Interrupted)
    result, = run.of(ev.ToolResult)
    assert not result.spoken
    assert state == {"cancelled": cancel, "finished": not cancel}
    if cancel:
        assert "cancelled" in result.error
    else:
        assert result.output == "booked" and result.error is None
    turn = [t for t in run.conversation["turns"] if t["role"] == "assistant"][0]
    assert turn["interrupted"] and "booked" not in turn["heard"] and not turn["tools"][0]["spoken"]


def test_failures_and_bad_arguments_are_told_to_the_model_and_the_session_goes_on(vad_model, jfk16):
    """A tool that raises, and a call with arguments that do not fit: the model is told the error as
    the result (it speaks it here), an error is never raised into the session."""
    async def broken(x: int) -> str:
        """Always fails."""
        raise RuntimeError("the backend is down")

    reply = 'First. [[broken {"x": 1}]] Then {result}. [[weather {"city": 3}]] And {result}.'
    agent, run = _one_turn(vad_model, jfk16, reply, [tool(broken), weather])
    first, second = run.of(ev.ToolResult)
    assert "the backend is down" in first.error and json.loads(first.output)["error"] == first.error
    assert "must be a string" in second.error
    done = run.of(ev.ReplyDone)[0]
    assert not done.interrupted and "the backend is down" in done.heard and "must be a string" in done.heard
    assert not [e for e in run.of(ev.Error) if e.stage != "tool"]


def test_an_unknown_tool_and_a_tool_free_agent(vad_model, jfk16):
    """A call naming no registered tool is answered with the list of tools; Tool checks its name."""
    agent, run = _one_turn(vad_model, jfk16, "Hm. [[nope {}]] So {result}.", [weather])
    result, = run.of(ev.ToolResult)
    assert "there is no tool 'nope'" in result.error and "weather" in result.error
    with pytest.raises(ConfigError, match="tool name"):
        Tool(name="no spaces", description="x", parameters={"type": "object"}, fn=weather.fn)


def test_the_record_puts_each_call_among_the_words_heard():
    """The next turn's context: the words heard before a call with the call, its output, then the
    words heard after; a reply cut off before its call was heard shows no call at all."""
    from duplex.conversation import Conversation, ToolUse
    from duplex.events import Word
    from duplex.tools import ToolCall

    def reply(heard_words: int, spoken: bool) -> list[Message]:
        conversation = Conversation("Be brief.")
        conversation.user_turn_ended("weather please", 0, 16_000, 1.0)
        turn = conversation.reply_started(1, 0, 24_000, 1.0)
        words = "Let me look. It is sunny.".split()
        turn.words = [Word(w, i * 1000, (i + 1) * 1000) for i, w in enumerate(words)]
        call = ToolCall("call_1_1", "weather", {"city": "Paris"})
        turn.tools.append(ToolUse(call, text_before="Let me look.", started_wall=1.0, output='{"sky": "sunny"}',
                                  spoken=spoken))
        turn.played = heard_words * 1000
        conversation.reply_closed(1, interrupted=heard_words < len(words))
        return list(conversation.messages())

    call = ToolCall("call_1_1", "weather", {"city": "Paris"})
    assert reply(6, True) == [Message("user", "weather please"), Message("assistant", "Let me look.", tool_call=call),
                              Message("tool", '{"sky": "sunny"}'), Message("assistant", "It is sunny.")]
    assert reply(2, False) == [Message("user", "weather please"), Message("assistant", "Let me")]
