"""The one slot pool every engine takes its session rows from: lowest free row first (batches stay
compact), reserved rows never handed out, a double release and a full pool named, and the LLM, TTS
and ASR engines all holding their rows through it."""

from __future__ import annotations

import pytest

from duplex.engine.slots import SlotPool
from llm_fixtures import make_llm, tiny_checkpoints  # noqa: F401 (fixtures)
from tts_fixtures import make_engine, tiny_tts_checkpoint  # noqa: F401 (fixtures)


def test_take_gives_the_lowest_free_row_and_a_full_pool_names_its_option():
    """Rows come back lowest first, whatever order they were given back in; the error of a full pool
    says how many rows it has and which option raises them."""
    pool = SlotPool("LLM session slots", 4)
    rows = [pool.take() for _ in range(4)]
    assert rows == [0, 1, 2, 3] and pool.free == 0
    with pytest.raises(RuntimeError, match=r"all 4 LLM session slots are in use; raise engine_slots"):
        pool.take()
    pool.give(3)
    pool.give(1)
    assert pool.free == 2 and pool.take() == 1 and pool.take() == 3


def test_a_row_given_back_twice_or_never_taken_is_an_error():
    """Giving a row back twice would hand it to two sessions at once: it raises instead."""
    pool = SlotPool("TTS reply slots", 2)
    row = pool.take()
    pool.give(row)
    with pytest.raises(RuntimeError, match="row 0 released twice"):
        pool.give(row)
    with pytest.raises(RuntimeError, match="row 1 never taken"):
        pool.give(1)


def test_an_unbounded_pool_grows_past_its_reserved_row():
    """The ASR's pool has no capacity (its caches grow) but never hands out the scratch row that the
    padding of a captured step writes to."""
    pool = SlotPool("ASR stream slots", None, reserved=(2,))
    assert [pool.take() for _ in range(4)] == [0, 1, 3, 4]
    pool.give(1)
    assert pool.take() == 1 and pool.held == 4 and 2 not in pool
    with pytest.raises(RuntimeError, match="no free count"):
        pool.free


def test_a_holder_moves_to_a_free_row_and_its_old_row_is_free_again():
    """A move (the LLM packing a decode step's rows) takes a free row, given back or never handed out
    (the rows skipped on the way become free, the reserved one never), and frees the old one; moving
    onto a held, reserved or missing row, or from a row not held, raises."""
    pool = SlotPool("LLM session slots", 6, reserved=(4,))
    rows = [pool.take() for _ in range(3)]
    pool.give(1)
    pool.move(2, 1)  # a row given back
    assert 1 in pool and 2 not in pool and pool.held == 2
    pool.move(0, 5)  # never handed out: 2 and 3 are free, 4 stays reserved
    assert 0 not in pool and 5 in pool and [pool.take() for _ in range(3)] == [0, 2, 3]
    assert rows == [0, 1, 2] and pool.free == 0
    for row, to, message in ((0, 1, "not free"), (0, 4, "not free"), (0, 6, "not free"), (4, 1, "not held")):
        with pytest.raises(RuntimeError, match=message):
            pool.move(row, to)


def test_the_engines_hold_their_rows_in_one_pool(make_llm, make_engine):
    """The LLM's session slots and the TTS's reply slots are SlotPools: an LLM slot released twice
    raises, and every row comes back."""
    engine = make_llm("qwen2", window=128, slots=2).engine
    slot = engine.new_slot()
    assert slot.row == 0 and slot.row in engine.rows and engine.free_slots == 1
    engine.release(slot)
    with pytest.raises(RuntimeError, match="LLM session slots: row 0 released twice"):
        engine.release(slot)
    assert engine.free_slots == engine.slots
    tts = make_engine(slots=3)
    assert isinstance(tts.rows, SlotPool) and tts.free_slots == 3
