"""Conversations a client may continue after reconnecting: kept for a while after their connection
ends, found again by a secret token that only that client holds.

The answer to a new session's offer carries ``resume_token``; an offer for a new session that
carries ``resume`` with that token, within ``ttl_s`` of the old connection's end, continues the same
conversation record, and with it the LLM's context (rebuilt from the record: the words heard, the
user's turns). A token works once (the continued session answers with a new one). The store is
bounded: past ``capacity`` the conversation that ended first is dropped. Tokens are kept hashed, so
a lookup's timing says nothing about the tokens held.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from duplex.conversation import Conversation


def new_token() -> str:
    return secrets.token_urlsafe(24)


def _key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class ResumableConversations:
    ttl_s: float = 300.0
    capacity: int = 64
    _kept: OrderedDict[str, tuple[Conversation, float]] = field(default_factory=OrderedDict)

    def keep(self, token: str, conversation: Conversation) -> None:
        """``conversation`` (its connection has ended) may be continued with ``token`` for ``ttl_s``."""
        self._expire()
        if not conversation.turns or self.ttl_s <= 0:
            return  # nothing said: nothing to continue
        self._kept[_key(token)] = (conversation, time.monotonic() + self.ttl_s)
        while len(self._kept) > self.capacity:
            self._kept.popitem(last=False)

    def take(self, token: str) -> Conversation | None:
        """The conversation ``token`` continues (once), or None if it names none, or too long ago."""
        self._expire()
        kept = self._kept.pop(_key(token), None)
        return None if kept is None else kept[0]

    def __len__(self) -> int:
        self._expire()
        return len(self._kept)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._kept and next(iter(self._kept.values()))[1] <= now:
            self._kept.popitem(last=False)
