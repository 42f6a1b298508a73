"""Tool calls on the real LLM path (tiny Qwen2 weights, a chat template with a Hermes-style tool format
like Qwen2.5's): the format is read from the template, a dialogue with a call and its result renders
to exactly the template's tokens, and a reply whose text holds a call stops there and yields it."""

from __future__ import annotations

import copy
import json

import pytest

from duplex.llm.chat import ChatFormat, DialogueTokens
from duplex.llm.model import LLMSettings, SinkLLM
from duplex.llm.stream import SinkLLMStream
from duplex.stages import Message
from duplex.tools import ToolCall, ToolCallText, tool
from llm_fixtures import tiny_checkpoints  # noqa: F401 (fixtures)

# A ChatML template with tools, written for these tests in the shape of Qwen2.5's: the tools in the
# system block, calls as <tool_call> JSON </tool_call> in the assistant's text, results in a user turn.
TOOL_TEMPLATE = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' + (messages[0]['content'] if messages[0]['role'] == 'system' else '') -}}"
    "{{- '\\n\\n# Tools\\nCall one by writing <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.\\n<tools>' -}}"
    "{%- for t in tools -%}{{- '\\n' + (t | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools><|im_end|>\\n' -}}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' and message.tool_calls -%}"
    "{{- '<|im_start|>assistant' -}}{%- if message['content'] -%}{{- '\\n' + message['content'] -}}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' "
    "+ (call.function.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


@tool
async def weather(city: str) -> dict:
    """The current weather in a city."""
    return {"sky": "sunny"}


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_checkpoints):
    _, tokenizer = tiny_checkpoints["qwen2"]
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = TOOL_TEMPLATE
    return tokenizer


def _dialogue(call: ToolCall) -> list[Message]:
    return [Message("user", "What is the weather in Paris?"), Message("assistant", "Let me look.", tool_call=call),
            Message("tool", json.dumps({"sky": "sunny"})), Message("assistant", "It is sunny."),
            Message("user", "Thanks.")]


def test_the_tool_format_is_read_from_the_template_and_renders_exactly(tool_tokenizer, tiny_checkpoints):
    """The markers and the tool message's wrappers come from the template; a dialogue with a call, its
    result and more turns tokenises to exactly what the whole template renders (tools in the system
    block included). The tiny models' plain ChatML template has no tool format: no tools."""
    fmt = ChatFormat.from_tokenizer(tool_tokenizer)
    assert fmt.tool_markers == ("<tool_call>", "</tool_call>")
    plain = ChatFormat.from_tokenizer(tiny_checkpoints["qwen2"][1])
    assert plain.tool_markers is None and "tool" not in plain.wrappers
    call = ToolCall("call_1", "weather", {"city": "Paris"})
    messages = _dialogue(call)
    tokens = DialogueTokens(fmt, "Be brief.", (weather.schema(),))
    tokens.update(messages, generation_prompt=True)
    whole = tool_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}]
        + [{"role": m.role, "content": m.content,
            **({"tool_calls": [{"type": "function", "function": {"name": m.tool_call.name,
                                                                 "arguments": m.tool_call.arguments}}]}
               if m.tool_call else {})} for m in messages],
        tools=[weather.schema()], tokenize=False, add_generation_prompt=True)
    assert "<tools>" in whole and '"name": "weather"' in whole
    assert list(tokens.ids(0)) == tool_tokenizer(whole, add_special_tokens=False)["input_ids"]


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


async def test_a_reply_with_a_call_stops_there_and_goes_on_from_the_result(tool_tokenizer, tiny_checkpoints,
                                                                           monkeypatch):
    """The tiny model is made to write a reply with a tool call (its sampled tokens replaced by a
    script): the stream yields the words before the call, then the ToolCall, and stops; asked again
    with the call and its result, it replies from a context equal to the template's rendering."""
    model, _ = tiny_checkpoints["qwen2"]
    llm = SinkLLM(model, tool_tokenizer, "cpu", LLMSettings(window=1024, max_reply_tokens=400), slots=2)
    script: list[int] = []
    real_took = SinkLLMStream._took

    def scripted(self, reply, token):
        return real_took(self, reply, script.pop(0) if script else next(iter(self.model.format.stop_ids)))

    monkeypatch.setattr(SinkLLMStream, "_took", scripted)
    stream = llm.new_stream("Be brief.", [weather.schema()])
    try:
        script[:] = llm.format.encode('Let me look.\n<tool_call>\n{"name": "weather", "arguments": '
                                      '{"city": "Paris"}}\n</tool_call>').tolist()
        question = [Message("user", "What is the weather in Paris?")]
        pieces = [p async for p in stream.reply(question)]
        call = pieces[-1]
        assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("weather", {"city": "Paris"})
        assert "".join(pieces[:-1]).strip() == "Let me look."
        script[:] = llm.format.encode("It is sunny.").tolist()
        asked = [*question, Message("assistant", "Let me look.", tool_call=ToolCall("c1", "weather", call.arguments)),
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
