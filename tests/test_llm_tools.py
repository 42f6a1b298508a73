"""Tool calls on the real LLM path (tiny Qwen2 weights, a chat template with a Hermes-style tool format
like Qwen2.5's): the format is read from the template, a dialogue with a call and its result renders
to exactly the template's tokens, and a reply whose text holds a call stops there and yields it."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from duplex.llm.chat import ChatFormat, DialogueTokens
from duplex.llm.model import LLMSettings, SinkLLM
from duplex.llm.stream import SinkLLMStream
from duplex.stages import Message
from duplex.tools import ToolCall, ToolCallText, tool
from llm_fixtures import tiny_checkpoints  # noqa: F401 (fixtures)

@tool
async def weather(city: str) -> dict:
    """The current weather in a city."""
    return {"sky": "sunny"}


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_checkpoints):
    """The tiny Qwen2's own tokenizer: its template has Qwen2.5's tool format (llm/tiny.py)."""
    _, tokenizer = tiny_checkpoints["qwen2"]
    return tokenizer


def _dialogue(call: ToolCall) -> list[Message]:
    return [Message("user", "What is the weather in Paris?"), Message("assistant", "Let me look.", tool_call=call),
            Message("tool", json.dumps({"sky": "sunny"})), Message("assistant", "It is sunny."),
            Message("user", "Thanks.")]


PLAIN_CHATML = ("{%- for message in messages -%}"
                "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
                "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


@pytest.mark.parametrize(("arch", "markers"), [("qwen2", ("<tool_call>", "</tool_call>")), ("llama", ("", ""))])
def test_the_tool_format_is_read_from_the_template_and_renders_exactly(arch, markers, tiny_checkpoints):
    """The call markers come from the template (Qwen2.5's <tool_call> tags; none around Llama 3.1's
    bare JSON); a dialogue with a call, its result and more turns tokenises to exactly what the whole
    template renders (tools in the system block; Llama's result passed through tojson by it). A
    template without a tool format: no tools."""
    tokenizer = tiny_checkpoints[arch][1]
    fmt = ChatFormat.from_tokenizer(tokenizer)
    assert fmt.tool_markers == markers
    plain_tokenizer = copy.deepcopy(tiny_checkpoints["qwen2"][1])
    plain_tokenizer.chat_template = PLAIN_CHATML
    assert ChatFormat.from_tokenizer(plain_tokenizer).tool_markers is None
    call = ToolCall("call_1", "weather", {"city": "Paris"})
    messages = _dialogue(call)
    tokens = DialogueTokens(fmt, "Be brief.", (weather.schema(),))
    tokens.update(messages, generation_prompt=True)
    whole = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}]
        + [{"role": m.role, "content": m.content,
            **({"tool_calls": [{"type": "function", "function": {"name": m.tool_call.name,
                                                                 "arguments": m.tool_call.arguments}}]}
               if m.tool_call else {})} for m in messages],
        tools=[weather.schema()], tokenize=False, add_generation_prompt=True, tools_in_user_message=False)
    assert '"name": "weather"' in whole and "Be brief." in whole
    assert list(tokens.ids(0)) == tokenizer(whole, add_special_tokens=False)["input_ids"]


def test_the_call_parser_passes_speech_and_holds_back_a_marker_start():
    """Text before the call is speech at once, but for what may begin the marker; the call's JSON
    is parsed when its closing marker arrives; a call that is not JSON is kept as its text."""
    parser = ToolCallText("<tool_call>", "</tool_call>")
    assert parser.feed("Let me look. <tool") == ("Let me look. ", None)
    assert parser.feed('_call>\n{"name": "weather", ') == ("", None)
    assert parser.feed('"arguments": {"city": "Paris"}}\n</tool_call>') == \
        ("", ToolCall("", "weather", {"city": "Paris"}))
    other = ToolCallText("<tool_call>", "</tool_call>")
    assert other.feed("a < b <t") == ("a < b ", None) and other.end() == ("<t", None)
    broken = ToolCallText("<tool_call>", "</tool_call>")
    assert broken.feed("<tool_call>weather(Paris)") == ("", None)
    assert broken.end() == ("", ToolCall("", "?", "weather(Paris)"))


def test_a_bare_json_call_is_the_whole_reply():
    """Without markers (Llama 3.1): a reply that begins with '{' is held back and is a call once its
    JSON closes ("parameters" read as the arguments); a reply that begins with words is speech, a '{'
    later in it included; a '{' that never becomes a call is told to the model as it stands."""
    parser = ToolCallText("", "")
    assert parser.feed(' {"name": "weather", ') == ("", None)
    assert parser.feed('"parameters": {"city": "Paris"}}') == ("", ToolCall("", "weather", {"city": "Paris"}))
    words = ToolCallText("", "")
    assert words.feed("It is ") == ("It is ", None) and words.feed('{"name": 1}') == ('{"name": 1}', None)
    assert words.end() == ("", None)
    broken = ToolCallText("", "")
    assert broken.feed("{weather") == ("", None) and broken.end() == ("", ToolCall("", "?", "{weather"))


@pytest.mark.parametrize(("arch", "written", "said"), [
    ("qwen2", 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me look."),
    ("llama", '{"name": "weather", "parameters": {"city": "Paris"}}', "")])
async def test_a_reply_with_a_call_stops_there_and_goes_on_from_the_result(arch, written, said, tiny_checkpoints,
                                                                           monkeypatch):
    """The tiny model is made to write a reply with a tool call (its sampled tokens replaced by a
    script; Qwen2.5's tagged call after words, Llama 3.1's bare JSON): the stream yields the words
    before the call, then the ToolCall, and stops; asked again with the call and its result, it
    replies from a context equal to the template's rendering."""
    model, tokenizer = tiny_checkpoints[arch]
    llm = SinkLLM(model, tokenizer, "cpu", LLMSettings(window=1024, max_reply_tokens=400), slots=2)
    script: list[int] = []
    real_took = SinkLLMStream._took

    def scripted(self, reply, token):
        return real_took(self, reply, script.pop(0) if script else next(iter(self.model.format.stop_ids)))

    monkeypatch.setattr(SinkLLMStream, "_took", scripted)
    stream = llm.new_stream("Be brief.", [weather.schema()])
    try:
        script[:] = llm.format.encode(written).tolist()
        question = [Message("user", "What is the weather in Paris?")]
        pieces = [p async for p in stream.reply(question)]
        call = pieces[-1]
        assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("weather", {"city": "Paris"})
        assert "".join(pieces[:-1]).strip() == said
        script[:] = llm.format.encode("It is sunny.").tolist()
        asked = [*question, Message("assistant", said, tool_call=ToolCall("c1", "weather", call.arguments)),
                 Message("tool", json.dumps({"sky": "sunny"}))]
        pieces = [p async for p in stream.reply(asked)]
        assert "".join(p for p in pieces if isinstance(p, str)).strip() == "It is sunny."
        ctx = stream.context
        assert ctx is not None
        expected = DialogueTokens(llm.format, "Be brief.", (weather.schema(),))
        expected.update(asked, generation_prompt=True)
        n = expected.length
        assert list(ctx.dialogue.ids(0, n)) == list(expected.ids(0))
    finally:
        await stream.aclose()
        llm.close()


async def test_configure_rebuilds_the_context_under_the_new_system_block(tool_tokenizer, tiny_checkpoints):
    """New instructions and tools for a running stream (a Realtime client's session.update): its next
    call runs on a context equal to the template's rendering of the dialogue under the new system
    block, and gives the estimate a fresh stream made with them gives."""
    model, _ = tiny_checkpoints["qwen2"]
    llm = SinkLLM(model, tool_tokenizer, "cpu", LLMSettings(window=1024, max_reply_tokens=4), slots=3)
    stream = llm.new_stream("Be brief.")
    fresh = llm.new_stream("Answer in French.", [weather.schema()])
    try:
        dialogue = [Message("user", "What is the weather in Paris?")]
        before = await stream.listen(dialogue)
        await stream.configure("Answer in French.", [weather.schema()])
        after = await stream.listen(dialogue)
        expected = DialogueTokens(llm.format, "Answer in French.", (weather.schema(),))
        expected.update(dialogue, open_last=True)
        ctx = stream.context
        assert ctx is not None and ctx.end == expected.length
        assert list(ctx.dialogue.ids(0, expected.length)) == list(expected.ids(0))
        assert after == await fresh.listen(dialogue) and after != before
    finally:
        await stream.aclose()
        await fresh.aclose()
        llm.close()


def test_a_tiny_session_calls_a_tool_and_goes_on_from_its_result(jfk16, monkeypatch):
    """End to end on the tiny profile (the real VAD, streaming ASR, sink-cache LLM and codec TTS):
    only the LLM's sampled tokens are scripted (random weights never write a call). The tool's
    schema reaches the system block through the tiny Qwen2's own template, the call written in the
    reply's text is parsed there, the tool runs, its result is prefilled as the template's tool
    message, the reply goes on from it, and the record, the events and the audio carry all of it."""
    from duplex import events as ev
    from duplex.agent import Agent
    from duplex.clock import run_virtual
    from duplex.config import AgentConfig
    from tests.fake_agent import drive

    call = 'Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    scripts: dict[int, list[int]] = {}
    shown: list = []  # the tools each reply's system block showed
    real_start, real_took = SinkLLMStream.plan_start, SinkLLMStream._took

    def start(self, reply, messages):  # the call first; once the result is in, the rest of the reply
        going_on = bool(messages) and messages[-1].role == "tool"
        scripts[id(reply)] = self.model.format.encode("It is sunny." if going_on else call).tolist()
        shown.append(self._context().dialogue.tools)
        return real_start(self, reply, messages)

    def took(self, reply, token):
        script = scripts.get(id(reply))
        return real_took(self, reply, script.pop(0) if script else next(iter(self.model.format.stop_ids)))

    monkeypatch.setattr(SinkLLMStream, "plan_start", start)
    monkeypatch.setattr(SinkLLMStream, "_took", took)

    async def main():
        agent = await Agent.load(AgentConfig(profile="tiny", device="cpu", engine_slots=2, max_reply_tokens=200),
                                 tools=[weather])
        try:
            session = agent.session()
            run = await drive(agent, np.concatenate([jfk16[int(0.2 * 16000):int(2.4 * 16000)],
                                                     np.zeros(12 * 16000, np.float32)]), session=session)
            return run
        finally:
            await agent.aclose()

    run = run_virtual(main())
    called, = run.of(ev.ToolCalled)
    result, = run.of(ev.ToolResult)
    assert called.name == "weather" and json.loads(called.arguments) == {"city": "Paris"}
    assert result.call_id == called.call_id and json.loads(result.output) == {"sky": "sunny"} and result.spoken
    done = run.of(ev.ReplyDone)[0]
    assert not done.interrupted and done.heard == "Let me look. It is sunny."
    turn = [t for t in run.conversation["turns"] if t["role"] == "assistant"][0]
    assert turn["tools"][0]["name"] == "weather" and turn["tools"][0]["spoken"]
    assert sum(e.samples for e in run.of(ev.ReplyAudio)) > 0
    assert shown and all(tools == (weather.schema(),) for tools in shown)
