"""The end-of-turn estimate of the user's words does not depend on a speculation: a listen of the
words a speculative reply answers, made while that reply holds the cache, gives the very number a
listen gives with no reply in flight (tiny random LLM; issue 21: the estimate was scored on top of
the reply's generation prompt and first tokens, 21% higher, and it picks the commit wait)."""

from __future__ import annotations

import pytest

from duplex.stages import Message
from llm_fixtures import SHORT_SYSTEM, make_llm, single_torch_thread, tiny_checkpoints  # noqa: F401

PARTIAL = [Message("user", "What will the weather be")]
FINAL = [Message("user", "What will the weather be like tomorrow in Paris")]


async def _estimate(llm, *, speculate: list[Message] | None, listened: list[list[Message]]) -> float:
    """Listen to ``listened`` in turn, start a reply to ``speculate`` (its prefill and first token
    run: it holds the cache), then listen to FINAL."""
    stream = llm.new_stream(SHORT_SYSTEM)
    for messages in listened:
        await stream.listen(messages)
    reply = None
    if speculate is not None:
        reply = stream.reply(speculate)
        await reply.__anext__()
        assert stream._active is not None  # the first piece came: its prefill ran
    p = await stream.listen(FINAL)
    if reply is not None:
        await reply.aclose()
    await stream.aclose()
    assert p is not None
    return p


@pytest.mark.parametrize("listened", [[PARTIAL], [PARTIAL, FINAL], []],
                         ids=["final-words-new-to-the-reply", "final-words-listened-before", "nothing-listened"])
async def test_the_estimate_is_the_same_with_a_speculation_in_flight(make_llm, listened):
    """The speculation answers FINAL (what the policy asks for when the speech stops): its listen
    while the reply runs equals, exactly, the listen of the same history with no reply, whether the
    words reached the cache first through a listen or through the reply's own prefill."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16, temperature=0.0)
    alone = await _estimate(llm, speculate=None, listened=listened)
    during = await _estimate(llm, speculate=FINAL, listened=listened)
    assert during == alone


async def test_a_reply_to_other_words_still_scores_on_top_and_is_left_as_it_was(make_llm):
    """Control: words the running reply does not answer (a reply that is being given up) are still
    scored on top of it and rolled back; that estimate is a different number, which is why the
    speculation's own words are answered from before its tokens."""
    llm = make_llm("qwen2", window=256, max_reply_tokens=16, temperature=0.0)
    alone = await _estimate(llm, speculate=None, listened=[PARTIAL])
    on_top = await _estimate(llm, speculate=PARTIAL, listened=[PARTIAL])
    assert on_top != alone
