"""Text around the LLM: chat-template rendering per message, incremental detokenisation, and reply
text cleaned for speech."""

from __future__ import annotations

import random

import pytest

from duplex.llm.chat import ChatFormat, DialogueTokens
from duplex.llm.engine import TextDecoder
from duplex.llm.speech_text import SpeechText
from duplex.stages import Message
from llm_fixtures import (  # noqa: F401 (fixtures)
    ARCHS, tiny_checkpoints, single_torch_thread,
)

DIALOGUE = [Message("user", "Hello there."), Message("assistant", "Hi! How can I help?"),
            Message("user", "What's the weather like tomorrow? 😀"), Message("assistant", "Sunny, I think."),
            Message("user", "Thanks")]


@pytest.mark.parametrize("arch", ARCHS)
def test_per_message_rendering_equals_the_chat_template(tiny_checkpoints, arch):
    """Tokenising each message with its role's wrappers gives exactly the tokens of the whole chat
    template rendering (with and without the generation prompt); the end-of-message token is the
    template's (<|im_end|> for ChatML, <|eot_id|> for Llama 3) and ends replies too."""
    tokenizer = tiny_checkpoints[arch][1]
    fmt = ChatFormat.from_tokenizer(tokenizer)
    chat = [{"role": "system", "content": "Be brief."}] + [{"role": m.role, "content": m.content} for m in DIALOGUE]
    for gen in (False, True):
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        dialogue = DialogueTokens(fmt, "Be brief.")
        dialogue.update(DIALOGUE, generation_prompt=gen)
        assert dialogue.ids(0).tolist() == want
    eom = {"qwen2": "<|im_end|>", "llama": "<|eot_id|>"}[arch]
    assert tokenizer.convert_ids_to_tokens(fmt.end_of_message) == eom
    assert fmt.end_of_message in fmt.stop_ids


def test_dialogue_update_reports_the_first_changed_token(tiny_checkpoints):
    """Re-rendering a dialogue re-tokenises only changed messages and says where it first differs:
    an unchanged dialogue differs nowhere, a revised last word differs inside the last message, a
    closed message differs where its suffix begins."""
    fmt = ChatFormat.from_tokenizer(tiny_checkpoints["qwen2"][1])
    d = DialogueTokens(fmt, "Be brief.")
    d.update(DIALOGUE[:2] + [Message("user", "book a table for two")], open_last=True)
    n, before = d.length, d.ids(0)
    assert d.update(DIALOGUE[:2] + [Message("user", "book a table for two")], open_last=True) == n
    first = d.update(DIALOGUE[:2] + [Message("user", "book a table for ten")], open_last=True)
    after = d.ids(0)
    assert d.starts[3] < first < d.length
    assert (before[:first] == after[:first]).all() and before[first] != after[first]
    closed = d.update(DIALOGUE[:2] + [Message("user", "book a table for ten")])
    assert closed == d.length - len(fmt.encode(fmt.wrappers["user"][1]))
    assert d.update(DIALOGUE[:1]) == d.length == d.starts[1] + len(d.segments[1])  # messages removed


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_detokenisation_equals_one_decode(tiny_checkpoints, arch):
    """Text released token by token (holding back split multi-byte characters) joins to the decode
    of all tokens at once."""
    tokenizer = tiny_checkpoints[arch][1]
    text = "Héllo wörld 😀👍🏽 — ¿qué tal? 你好 fine, thanks"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = TextDecoder(tokenizer)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


RAW = ("Sure! 😀 Here is **the plan**:\n\n1. Buy *eggs*\n2. Call [Anna](http://x.y/z) now\n- `done`\n"
       "## Next step\nThat is all. 👍🏽")


def test_speech_text_removes_markdown_and_emoji_however_it_is_split():
    """Markdown marks, list and heading markers, link targets and emoji are removed, line breaks
    become spaces (a comma where a line ended without punctuation), and the result does not depend
    on how the text was split into pieces."""
    want = "Sure! Here is the plan: Buy eggs, Call Anna now, done, Next step, That is all."
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(RAW)), rng.randint(1, 30)))
        pieces = [RAW[a:b] for a, b in zip([0] + cuts, cuts + [len(RAW)])]
        s = SpeechText()
        assert "".join(s.feed(p) for p in pieces) + s.flush() == want


def test_speech_text_keeps_plain_speech_and_releases_whole_words():
    """Plain sentences pass unchanged (numbers, hyphens, apostrophes); a word is released once the
    whitespace after it arrives, and control characters never come out."""
    s = SpeechText()
    assert s.feed("It's 9.15 on platform four") == "It's 9.15 on platform"
    assert s.feed(", well-known\x01 route.") == " four, well-known"
    assert s.flush() == " route."
