"""The conversation record keeps what the person heard, and the LLM sees only that."""

from duplex.conversation import Conversation
from duplex.events import Word
from duplex.stages import Message


def _reply_with_words(conv: Conversation, rid: int = 1) -> None:
    conv.user_turn_ended("tell me a story", 0, 16000, 1.0)
    reply = conv.reply_started(rid, 0, 24000, 1.0)
    reply.text = "Once upon a time there was a fox."
    reply.words = [Word(w, i * 1000, (i + 1) * 1000) for i, w in enumerate(reply.text.split())]


def test_interrupted_reply_is_cut_to_the_word_at_the_playback_position():
    """Words count as heard when at least half was played; the rest never reach the record."""
    conv = Conversation()
    _reply_with_words(conv)
    conv.reply(1).played = 3400  # "Once" "upon" "a" played fully, "time" 40 %
    reply = conv.reply_closed(1, interrupted=True)
    assert reply.heard == "Once upon a"
    assert reply.interrupted
    assert conv.messages() == [Message("user", "tell me a story"), Message("assistant", "Once upon a")]
    assert conv.to_json()["turns"][1]["heard"] == "Once upon a"


def test_messages_merge_and_pending_text():
    """An unheard reply is dropped and the user's turn reopens; pending words replace it."""
    conv = Conversation()
    _reply_with_words(conv)
    conv.reply_cancelled_unheard(1)
    assert conv.messages("tell me a story about a fox") == [Message("user", "tell me a story about a fox")]
    turn = conv.user_turn_ended("tell me a story about a fox", 0, 40000, 3.0)
    assert turn.index == 0 and len(conv.turns) == 1
    conv.reply_started(2, 0, 24000, 3.0)
    conv.reply_closed(2, interrupted=True)  # nothing played: nothing heard
    conv.user_turn_ended("hello?", 50000, 60000, 5.0)
    assert conv.messages() == [Message("user", "tell me a story about a fox hello?")]
