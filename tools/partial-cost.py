"""What one ASR partial costs the LLM's dialogue bookkeeping as the dialogue grows: the record's
``messages(pending)`` plus ``DialogueTokens.update`` (on the tiny Qwen2 tokenizer), at 10, 400 and
4000 messages, beside the same update given a plain list (every message compared, as before the
record handed out a ``Dialogue``). Ratios on one machine in one run, not absolute speeds.

Run from the repository: ``.venv/bin/python tools/partial-cost.py``.
"""

from __future__ import annotations

import timeit

from duplex.conversation import Conversation
from duplex.events import Word
from duplex.llm.chat import ChatFormat, DialogueTokens
from duplex.llm.loader import load_checkpoint
from duplex.llm.tiny import tiny_model_path


def dialogue(messages: int) -> Conversation:
    conv = Conversation()
    for i in range(messages // 2):
        conv.user_turn_ended(f"question {i}", 0, 1, 0.0)
        reply = conv.reply_started(i, i, 24000, 0.0)
        reply.words, reply.played = [Word("answer", 0, 1000), Word(str(i), 1000, 2000)], 2000
        conv.reply_closed(i, interrupted=False)
    return conv


def main() -> None:
    _, tokenizer = load_checkpoint(str(tiny_model_path("qwen2")), "cpu")
    fmt = ChatFormat.from_tokenizer(tokenizer)
    print("messages  per partial  whole-list compare")
    for n in (10, 400, 4000):
        conv = dialogue(n)
        tokens = DialogueTokens(fmt, "be brief")
        tokens.update(conv.messages("what"), open_last=True)
        count = [0]

        def partial(whole: bool = False) -> None:
            count[0] += 1
            messages = conv.messages("what about " + ("now" if count[0] % 2 else "then"))
            tokens.update(list(messages) if whole else messages, open_last=True)

        fast = timeit.timeit(partial, number=300) / 300
        slow = timeit.timeit(lambda: partial(whole=True), number=30) / 30
        print(f"{n:8d}  {fast * 1e6:8.1f} us  {slow * 1e6:12.1f} us")


if __name__ == "__main__":
    main()
