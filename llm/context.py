"""The dialogue held in an attention-sink cache, and how it follows the conversation.

:class:`SinkContext` is one session's LLM state. It keeps the token id in every cache slot and the
mapping from slots to dialogue tokens: slots ``[0, sink)`` hold the system block (dialogue tokens
``[0, sink)``), slots ``[sink, length)`` hold dialogue tokens ``[offset, offset + length - sink)``;
dialogue tokens ``[sink, offset)`` were evicted.

:meth:`SinkContext.sync` brings the cache up to a rendering of the dialogue: it finds the longest
common prefix of what the cache holds and the new rendering, truncates the cache there (cheap) and
prefills only the rest. That one rule gives incremental listening (the user's words are prefilled as
they arrive), rollback of revised partials, and, after an interruption, a cache that holds exactly
the words of the reply the person heard (the conversation record passes only those).

When new tokens do not fit, whole chunks of the oldest window tokens are evicted, cut at the start
of a message where one is near; the sink (the system prompt) is never evicted. A change to the
dialogue before ``offset`` (already evicted, so not comparable) rebuilds the cache from the dialogue's
most recent messages.

Every method is blocking model compute: call them on the LLM's worker thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from duplex.errors import ConfigError
from duplex.llm.chat import DialogueTokens
from duplex.llm.engine import Engine
from duplex.llm.sink_cache import SinkSlot
from duplex.stages import Message

MIN_SINK = 4  # StreamingLLM: at least four initial tokens act as attention sinks


@dataclass
class SinkContext:
    engine: Engine
    cache: SinkSlot  # this session's row of the engine's K/V pool
    dialogue: DialogueTokens
    evict_chunk: int  # evict at least this many tokens at a time (amortises the key re-rotation)
    ids: list[int] = field(default_factory=list)  # token id in each slot, len == cache length
    sink: int = 0
    offset: int = 0
    logits: torch.Tensor | None = None  # next-token logits after the last slot, when known
    open_role: str | None = None  # role of a message the cache ends inside (no suffix yet)
    evictions: int = 0
    prefilled: int = 0  # tokens run through the model (for tests and benchmarks; a kept system block is not run)

    @classmethod
    def create(cls, engine: Engine, dialogue: DialogueTokens, window: int, *, min_turn: int,
               rerotate: bool = True) -> SinkContext:
        """A context of ``window`` slots (the engine's window; it takes one of the engine's session
        rows until :meth:`close`); the system block must leave room for ``min_turn`` tokens."""
        if window != engine.window:
            raise ConfigError(f"a context of {window} slots on an engine of {engine.window}")
        dialogue.update([])
        sink = dialogue.system_length
        if sink < MIN_SINK:
            raise ConfigError(f"the system block renders to {sink} tokens; the attention sink needs at "
                              f"least {MIN_SINK}: give the LLM a system prompt")
        check_window(window, sink, min_turn)
        room = window - sink
        return cls(engine=engine, cache=engine.new_slot(rerotate=rerotate), dialogue=dialogue,
                   evict_chunk=max(1, min(evict_chunk_default(room), room)), sink=sink, offset=sink)

    # -- mapping -------------------------------------------------------------------------------

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def end(self) -> int:
        """Dialogue index just after the last held token."""
        return self.length if self.length <= self.sink else self.offset + self.length - self.sink

    @property
    def max_tail(self) -> int:
        """The longest tail :meth:`score` takes (half the window after the sink)."""
        return (self.capacity - self.sink) // 2

    # -- following the dialogue ----------------------------------------------------------------

    def sync(self, messages: Sequence[Message], *, open_last: bool = False,
             generation_prompt: bool = False) -> torch.Tensor:
        """Make the cache hold ``messages`` rendered (last one open, or followed by the generation
        prompt); returns the next-token logits after it."""
        rest = self.plan(messages, open_last=open_last, generation_prompt=generation_prompt)
        if len(rest):
            self.extend(rest)
        assert self.logits is not None
        return self.logits

    def plan(self, messages: Sequence[Message], *, open_last: bool = False,
             generation_prompt: bool = False) -> list[int]:
        """The first half of :meth:`sync`: truncate the cache to what it shares with ``messages``
        rendered (or rebuild it, if that is what they need) and return the tokens still to run after
        it. Run them with :meth:`extend`; :meth:`plan_pass` plans for a pass of several sessions
        (the engine's ``prefill_rows``, then :meth:`commit_prefilled`)."""
        first_change = self.dialogue.update(messages, open_last=open_last, generation_prompt=generation_prompt)
        last = messages[-1].role if messages else None
        self.open_role = last if open_last else ("assistant" if generation_prompt else None)
        total = self.dialogue.length
        if self.length == 0 or first_change < self.offset or total < self.offset:
            self._rebuild()
            return []
        # Longest common prefix of the held window and the new rendering, both from dialogue index
        # `offset` on (the sink is unchanged: a change there has first_change < offset).
        held = np.asarray(self.ids[self.sink:], dtype=np.int64)
        target = self.dialogue.ids(self.offset, min(self.end, total))
        same = int(np.argmin(np.append(held[:len(target)] == target, False)))
        self.truncate(self.sink + same)
        if self.end == total and self.logits is None:
            # Nothing new to run, but the last token's logits are gone: run it again.
            if self.length - 1 < self.sink < self.offset:
                self._rebuild()
                return []
            self.truncate(self.length - 1)
        return [int(t) for t in self.dialogue.ids(self.end, total)]

    def plan_pass(self, messages: Sequence[Message], *, open_last: bool = False,
                  generation_prompt: bool = False) -> list[int]:
        """:meth:`plan`, made ready for a pass of several sessions: room reserved for the tokens it
        returns, or, for a catch-up longer than :attr:`max_tail`, the tokens run here alone (in
        chunks) and none returned (the logits are then the cache's)."""
        tokens = self.plan(messages, open_last=open_last, generation_prompt=generation_prompt)
        if len(tokens) > self.max_tail:
            self.extend(tokens)
            return []
        self.reserve(len(tokens))
        return tokens

    def commit_prefilled(self, tokens: Sequence[int], logits: torch.Tensor) -> None:
        """A pass of several sessions ran ``tokens`` after what this cache held (room reserved first)."""
        self.ids.extend(int(t) for t in tokens)
        self.prefilled += len(tokens)
        self.logits = logits
        assert self.cache.length == len(self.ids)

    def extend(self, tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Run ``tokens`` after what the cache holds, evicting old chunks when they do not fit."""
        tokens = [int(t) for t in tokens]
        chunk = max(1, (self.capacity - self.sink) // 2)
        pos = 0
        while pos < len(tokens):
            piece = tokens[pos:pos + chunk]
            self.reserve(len(piece))
            self.logits, = self.engine.prefills([(self.cache, piece)])
            self.ids.extend(piece)
            self.prefilled += len(piece)
            pos += len(piece)
        assert self.logits is not None
        return self.logits

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens (evicting old chunks if they do not fit)."""
        free = self.capacity - self.length
        if n > free:
            self.evict(n - free)

    def commit_decoded(self, token: int) -> None:
        """A batched decode step ran ``token`` at position ``length`` (its K/V are written): count it."""
        self.cache.length += 1
        self.ids.append(int(token))
        self.logits = None  # the step's logits live in the engine's buffers
        self.prefilled += 1
        assert self.cache.length == len(self.ids)

    def close(self) -> None:
        """Give the session's row back to the engine."""
        if self.cache.row >= 0:
            self.engine.release(self.cache)
            self.cache.row = -1
        self.ids.clear()
        self.logits = None

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (rollback)."""
        if length < self.length:
            self.cache.truncate(length)
            del self.ids[length:]
            self.logits = None

    def evict(self, needed: int) -> int:
        """Free at least ``needed`` slots after the sink; returns how many were evicted."""
        held = self.length - self.sink
        if needed > held:
            raise RuntimeError(f"cannot free {needed} slots: only {held} are held after the sink")
        amount = min(held, max(needed, self.evict_chunk))
        # Prefer to cut where a message starts, if one is within another chunk of the cut.
        reach = min(held, amount + self.evict_chunk)
        cut = self.dialogue.next_boundary(self.offset + amount)
        if cut is not None and cut <= self.offset + reach:
            amount = cut - self.offset
        self.cache.evict(self.sink, amount)
        del self.ids[self.sink:self.sink + amount]
        self.offset += amount
        self.evictions += 1
        self.dialogue.prune(self.offset)
        return amount

    def _rebuild(self) -> torch.Tensor:
        """Start over from the system block and the most recent messages that fit."""
        self.truncate(0)
        self.sink = self.dialogue.system_length
        total = self.dialogue.length
        room = self.capacity - self.sink
        start = self.sink
        if total - self.sink > room:
            start = total - (room - self.evict_chunk)  # leave a chunk free
            cut = self.dialogue.next_boundary(start)
            if cut is not None and cut <= min(start + self.evict_chunk, total - 1):
                start = cut
        self.offset = start
        self.dialogue.prune(start)
        self._system_block()
        if total > start:
            self.extend(self.dialogue.ids(start, total))
        assert self.logits is not None
        return self.logits

    def _system_block(self) -> None:
        """The system block into the empty cache: the K/V and logits the engine kept for the same
        tokens (another session's, or this one's before a rebuild), else run here and kept."""
        ids = [int(t) for t in self.dialogue.ids(0, self.sink)]
        logits = self.engine.system_block(self.cache, ids)
        if logits is None:
            self.extend(ids)
            assert self.logits is not None
            self.engine.keep_system_block(self.cache, ids, self.logits)
        else:
            self.ids.extend(ids)
            self.logits = logits

    # -- replies and scoring ----------------------------------------------------------------------

    def score(self, tokens: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Logits after ``tokens`` appended to what the cache holds, then rolled back exactly."""
        tokens = [int(t) for t in tokens]
        mark = self.begin_score(len(tokens))
        logits, = self.engine.prefills([(self.cache, tokens)])
        self.end_score(mark, len(tokens))
        return logits

    def begin_score(self, n: int) -> tuple[int, torch.Tensor | None]:
        """Make room for a scoring tail of ``n`` tokens; returns what :meth:`end_score` rolls back to."""
        if n > self.max_tail:
            raise ValueError(f"a scoring tail of {n} tokens does not fit the window")
        self.reserve(n)
        return self.length, self.logits

    def end_score(self, mark: tuple[int, torch.Tensor | None], n: int) -> None:
        """A scoring tail of ``n`` tokens ran after :meth:`begin_score` gave ``mark``: roll it back."""
        length, logits = mark
        self.prefilled += n
        self.cache.truncate(length)
        self.logits = logits


def check_window(window: int, sink: int, min_turn: int) -> None:
    """A clear error when ``window`` slots cannot hold the sink and one turn."""
    if window < sink + min_turn:
        raise ConfigError(f"llm_window={window} tokens is too small: the system prompt takes {sink} "
                          f"(the attention sink) and one turn needs {min_turn} more; use at least "
                          f"{sink + min_turn}")


def evict_chunk_default(room: int) -> int:
    """A quarter of the window after the sink: few evictions, most of the context kept."""
    return max(1, room // 4)
