"""One session of the dialogue LM: listen, reply, judge backchannels (:class:`duplex.stages.LLMStream`).

The session's state (its attention-sink cache on one row of the engine's K/V pool) changes only on
the engine's worker thread, in the order the scheduler runs the work (:mod:`duplex.engine.scheduler`):

- :meth:`SinkLLMStream.listen` brings the cache up to the dialogue with the user's words so far
  (the last message left open) and returns P(the chat template's end-of-message token), read from
  the logits of that same prefill.
- :meth:`SinkLLMStream.listen` and the start of :meth:`SinkLLMStream.reply` (prefill up to the
  generation prompt, sample the first token) are items of the engine's one prefill pass per tick
  (:meth:`SinkLLM._prefill_batch`): the listens and reply starts of every session that asked run
  as one batch, their first tokens sampled together. A reply start makes the pass due at once.
- :meth:`SinkLLMStream.reply` then joins the engine's batched decode step as a row: every step runs the last
  sampled token of every replying session at once and samples the next ones. Pieces of text come
  back through the row's bounded queue, a few tokens ahead of the consumer at most; closing the
  iterator leaves the step (a step already running lands, no further one starts).
- While a reply is being generated the cache belongs to it: ``listen`` and ``is_backchannel`` then
  score a short tail (the user's words) on top of the cache and roll it back exactly, so the reply
  goes on unchanged. A listen of the very words the reply answers (a speculation started when the
  speech stopped, the ASR final's listen coming after) is answered with the estimate made before the
  reply's tokens (a listen's, or the reply's own prefill of the words left open), so the estimate
  that picks the commit wait is the same number whether or not a speculation is in flight.
  ``is_backchannel`` runs as an *urgent* job (before the next decode step, never
  behind bulk work) and also scores on top of a finished reply still in the cache (what the agent
  was saying is the context the question needs). Once the reply is closed, the next ``listen``
  truncates the cache to the words the person heard (the conversation record passes only those)
  and continues from there.
- Reply text is released word by word (a word once the whitespace after it arrives), cleaned of
  markdown and emoji (:mod:`duplex.llm.speech_text`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from duplex.llm.context import SinkContext
from duplex.llm.engine import DecodeRequest, Draw, TextDecoder, token_probabilities, token_probability
from duplex.llm.speech_text import SpeechText
from duplex.stages import Message, frozen
from duplex.tools import ToolCall, ToolCallText

if TYPE_CHECKING:
    from duplex.llm.model import SinkLLM

TOKENS_AHEAD = 4  # reply tokens the engine may make before the consumer takes them

BACKCHANNEL_QUESTION = (
    'While you were speaking, the user said: "{text}". Is that only a backchannel, like "mm-hm", '
    '"yeah" or "right", so you should keep talking? Answer yes or no.'
)


@dataclass
class _Reply:
    """One reply being generated."""

    decoder: TextDecoder
    last: int | None = None  # sampled, not yet run through the model
    count: int = 0
    started: bool = False  # its prefill ran: the cache holds its generation prompt and tokens
    stream: Any = None  # the SinkLLMStream it belongs to
    held: Any = None  # its Output of a decode step run ahead (booked, not yet handed out)


@dataclass
class Listen:
    """One session's listen, planned: the tokens to run on its cache and how the cache takes them
    (kept, or rolled back to ``mark`` when they only scored the user's words on top of a reply)."""

    stream: SinkLLMStream
    ctx: SinkContext
    tokens: list[int]
    mark: tuple[int, torch.Tensor | None] | None = None  # scoring: what SinkContext.end_score rolls back to
    messages: Sequence[Message] = ()
    known: float | None = None  # the estimate of these very messages, made before a reply took the cache

    def commit(self, logits: torch.Tensor | None) -> torch.Tensor | None:
        """The tokens ran (``logits`` after them; None: there were none): commit or roll back; returns
        the logits to read P(end of message) from (None: the estimate was known before)."""
        if self.known is not None:
            return None
        ctx = self.ctx
        if logits is None:
            assert ctx.logits is not None and self.mark is None
            return ctx.logits
        if self.mark is not None:
            ctx.end_score(self.mark, len(self.tokens))
        else:
            ctx.commit_prefilled(self.tokens, logits)
        return logits

    def estimated(self, p: float | None) -> float:
        """P(end of message) read from what :meth:`commit` returned (None: known before): kept as the
        estimate of these words (unless they were only scored on top of a reply) and returned."""
        if p is None:
            assert self.known is not None
            return self.known
        if self.mark is None:
            self.stream._estimate = (self.messages, p)
        return p


@dataclass
class Start:
    """One session's reply start, planned: the tokens to run on its cache up to the generation prompt."""

    stream: SinkLLMStream
    reply: _Reply
    ctx: SinkContext
    tokens: list[int]

    def commit(self, logits: torch.Tensor | None) -> torch.Tensor:
        """The tokens ran (``logits`` after them; None: there were none): commit them; returns the
        logits to sample the first token from."""
        if logits is None:
            assert self.ctx.logits is not None
            return self.ctx.logits
        self.ctx.commit_prefilled(self.tokens, logits)
        return logits


@dataclass(frozen=True)
class Ask:
    """What a session asks of the engine's prefill pass: a listen (``reply`` None) or a reply's start."""

    stream: SinkLLMStream
    messages: Sequence[Message]
    reply: _Reply | None = None


@dataclass
class SinkLLMStream:
    model: SinkLLM
    system_prompt: str
    tools: tuple[dict[str, Any], ...] = ()  # function schemas the system block shows (duplex.tools)
    _ctx: SinkContext | None = None
    _draws: int = 0  # tokens this session has sampled (the sampler's per-session counter)
    _active: _Reply | None = None
    _closed: bool = False
    _listens: int = 0  # listen jobs run, and their seconds on the worker (the prefill of new words)
    _listen_s: float = 0.0
    # The estimate of the last dialogue the cache held with the user's message open (a listen's, or
    # a reply's own before its generation prompt): a listen of the same words while a reply holds
    # the cache answers it, so a speculation never changes the estimate it waits for.
    _estimate: tuple[Sequence[Message], float] | None = None
    # A system prompt and tools asked for while a reply held the cache: taken up by the next call
    _next_system: tuple[str, tuple[dict[str, Any], ...]] | None = None

    @property
    def context(self) -> SinkContext | None:
        """The session's cache state (inspect it only between calls)."""
        return self._ctx

    def stats(self) -> dict[str, float]:
        """The session's cache figures (slots in use, bytes: constant, dialogue length, evictions) and
        its listen jobs (count, seconds on the worker)."""
        ctx = self._ctx
        jobs = {"listens": self._listens, "listen_s": self._listen_s}
        if ctx is None:
            return {"cache_tokens": 0, "cache_bytes": 0, "dialogue_tokens": 0, "evictions": 0, **jobs}
        return {"cache_tokens": ctx.length, "cache_bytes": ctx.cache.nbytes(), "dialogue_tokens": ctx.end,
                "evictions": ctx.evictions, **jobs}

    # -- the LLMStream contract ------------------------------------------------------------------

    async def listen(self, messages: Sequence[Message]) -> float | None:
        self._check_open()
        return await self.model.prefills.submit(Ask(self, frozen(messages)))

    async def reply(self, messages: Sequence[Message]) -> AsyncIterator[str | ToolCall]:
        self._check_open()
        scheduler = self.model.scheduler
        reply = _Reply(TextDecoder(self.model.engine.tokenizer), stream=self)
        self._active = reply
        speech = SpeechText()
        markers = self.model.format.tool_markers
        calls = ToolCallText(*markers) if markers is not None and self.tools else None
        row = None
        try:
            done, token = await self.model.prefills.submit(Ask(self, frozen(messages), reply), now=True)
            while True:
                text = reply.decoder.push(token) if token is not None else ""  # here, not on the engine's thread
                if not done and row is None:  # decode ahead while the consumer takes this piece
                    row = scheduler.join(reply, room=TOKENS_AHEAD)
                call = None
                if calls is not None:  # a tool call in the text ends the reply there
                    text, call = calls.feed(text)
                    if done and call is None:
                        tail, call = calls.end()
                        text += tail
                piece = speech.feed(text) if text else ""
                if done or call is not None:
                    piece += speech.flush()
                if piece:
                    yield piece
                if call is not None:
                    yield call
                    break
                if done:
                    break
                assert row is not None
                done, token = (await scheduler.next(row)).value
        finally:
            if row is not None:
                scheduler.leave(row)
            if self._active is reply:
                self._active = None

    async def is_backchannel(self, messages: Sequence[Message], text: str) -> bool:
        self._check_open()
        words = text.split()
        if not words:
            return True  # nothing was said: keep talking
        if len(words) > self.model.settings.backchannel_max_words:
            return False
        return await self.model.scheduler.run(self._backchannel, frozen(messages), " ".join(words), urgent=True)

    async def configure(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> None:
        self._check_open()
        await self.model.scheduler.run(self._configure, system_prompt, tuple(tools))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._active = None
        await self.model.scheduler.run(self._release)

    # -- jobs (worker thread) -------------------------------------------------------------------

    def _configure(self, system_prompt: str, tools: tuple[dict[str, Any], ...]) -> None:
        self._next_system = (system_prompt, tools)
        self._context()  # taken up now unless a reply holds the cache

    def _context(self) -> SinkContext:
        if self._next_system is not None and (self._active is None or not self._active.started):
            # a new system block: the context is rebuilt under it (the next call prefills the dialogue)
            (self.system_prompt, self.tools), self._next_system = self._next_system, None
            self._release()
            self._estimate = None
        if self._ctx is None:
            self._ctx = self.model.new_context(self.system_prompt, tools=self.tools)
        return self._ctx

    def plan_listen(self, messages: Sequence[Message]) -> Listen | None:
        """The first half of a listen (worker thread): the tokens it runs, on the cache made ready
        for them (truncated, or rebuilt, and room reserved); None when there is nothing to estimate
        (the last message is not the user's; the cache then follows the dialogue unless a reply holds
        it). :meth:`SinkLLM._listen_batch` runs the tokens of many sessions in one pass."""
        self._listens += 1
        self.model.listens += 1
        ctx = self._context()
        fmt = self.model.format
        if not messages or messages[-1].role != "user":
            if self._active is None:
                ctx.sync(messages)
            return None
        if self._active is not None and self._active.started:
            known = self._estimate
            if known is not None and (known[0] is messages or known[0] == messages):
                return Listen(self, ctx, [], messages=messages, known=known[1])  # before the reply's tokens
            # other words: score them on top of the reply, then roll back
            tail = fmt.encode(self._close_open(ctx) + fmt.render(messages[-1], open_=True))
            if len(tail) > ctx.max_tail:
                return None  # too long to score on top of the reply; no estimate this time
            tokens = [int(t) for t in tail]
            return Listen(self, ctx, tokens, mark=ctx.begin_score(len(tokens)))
        return Listen(self, ctx, ctx.plan_pass(messages, open_last=True), messages=messages)

    def draw(self) -> Draw:
        """How this session samples its next token."""
        settings = self.model.settings
        return Draw(settings.temperature, settings.top_p, settings.seed, self._draws, settings.fixed_length)

    def needs_words(self, messages: Sequence[Message]) -> bool:
        """Whether a reply to ``messages`` must first run the user's words left open, for their
        estimate (no listen of these very words has given it yet)."""
        known = self._estimate
        return bool(messages) and messages[-1].role == "user" and (known is None or known[0] != messages)

    def plan_start(self, reply: _Reply, messages: Sequence[Message]) -> Start | None:
        """The first half of a reply's start (worker thread): the tokens up to the generation prompt
        on the cache made ready for them; None when the reply was closed or superseded meanwhile.
        :meth:`SinkLLM._prefill_batch` runs a listen of the user's words first when
        :meth:`needs_words` (the estimate is then the one a listen of these words gives, whether it
        comes before the reply or while it runs), then these tokens with other sessions', and
        samples the first token."""
        if self._active is not reply:
            return None
        ctx = self._context()
        reply.started = True
        if self.needs_words(messages):  # (a pass that failed and re-runs alone)
            logits = ctx.sync(messages, open_last=True)
            self._estimate = (messages, token_probability(logits, [self.model.format.end_of_message]))
        return Start(self, reply, ctx, ctx.plan_pass(messages, generation_prompt=True))

    def started(self, reply: _Reply, token: int) -> tuple[bool, int | None]:
        """The pass sampled ``token``, the reply's first: book it; (finished, the token to say)."""
        self._draws += 1
        return self._took(reply, token)

    def decode_request(self, reply: _Reply) -> DecodeRequest | None:
        """This session's row of the next batched decode step (None: the reply was closed meanwhile)."""
        ctx = self._ctx
        if self._active is not reply or ctx is None or reply.last is None:
            return None
        ctx.reserve(1)
        return DecodeRequest(ctx.cache, reply.last, self.draw())

    def replying(self, reply: _Reply) -> bool:
        """Whether ``reply`` is still this stream's reply on its cache (not closed or superseded)."""
        return self._active is reply and self._ctx is not None

    def decoded(self, reply: _Reply, request: DecodeRequest, token: int) -> tuple[bool, int | None]:
        """The step ran ``request`` and sampled ``token``: commit both; (finished, the token to say)."""
        assert self._ctx is not None
        self._ctx.commit_decoded(request.token)
        self._draws += 1
        return self._took(reply, token)

    def _took(self, reply: _Reply, token: int) -> tuple[bool, int | None]:
        """Book a sampled token: (finished, the token to say, None for none). A stop token ends the
        reply before it. Its text is made by the reply's consumer, off the engine's thread."""
        if token in self.model.format.stop_ids:
            return True, None
        reply.last = token
        reply.count += 1
        return reply.count >= self.model.settings.max_reply_tokens, token

    def _backchannel(self, messages: Sequence[Message], text: str) -> bool:
        ctx = self._context()
        fmt = self.model.format
        if self._active is None and ctx.open_role != "assistant":
            ctx.sync(messages)  # no reply in the cache: bring it up to the dialogue first
        question = Message("user", BACKCHANNEL_QUESTION.format(text=text))
        tail = fmt.encode(self._close_open(ctx) + fmt.render(question) + fmt.generation_prompt)
        if len(tail) > ctx.max_tail:
            return False  # cannot ask within this window: yield, the safe choice
        logits = ctx.score(tail)
        yes_ids, no_ids = self.model.answer_ids
        yes, no = token_probabilities(logits, [yes_ids, no_ids])  # one host copy for both
        return yes > no

    def _close_open(self, ctx: SinkContext) -> str:
        """The text that ends the message the cache currently stops inside, if any."""
        if ctx.open_role is None:
            return ""
        return self.model.format.wrappers[ctx.open_role][1]

    def _release(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
        self._ctx = None

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM stream is closed")
