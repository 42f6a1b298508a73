"""The listen-while-speaking dialogue LM: one loaded model shared by the sessions of an agent.

:class:`SinkLLM` implements :class:`duplex.stages.LLMModel`. It owns the model's
:class:`~duplex.llm.engine.Engine` (weights, the K/V pool with one row per session, the batched
decode step) and its :class:`~duplex.engine.scheduler.Scheduler` (the worker thread; one decode
step for every replying session per tick, one prefill pass for the sessions' listens and reply
starts, backchannel checks between steps).
Each session's dialogue state lives in a :class:`~duplex.llm.stream.SinkLLMStream`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from duplex.engine.ahead import RunAhead
from duplex.engine.scheduler import Output, Scheduler
from duplex.errors import ConfigError
from duplex.llm.chat import ChatFormat, DialogueTokens
from duplex.llm.context import SinkContext, check_window
from duplex.llm.engine import DecodeRequest, Engine, Launched
from duplex.llm.stream import Ask, Listen, SinkLLMStream, Start

USER_TURN_TOKENS = 32  # room for a few words of the user, on top of a whole reply, in "one turn"
LISTEN_PERIOD_S = 0.08  # listens run together at most this often (one ASR chunk)


@dataclass(frozen=True)
class LLMSettings:
    window: int = 2048  # sink-cache slots: system prompt + rolling window
    max_reply_tokens: int = 160
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50  # tokens a draw chooses among, before top_p (0: the whole vocabulary, sorted each step)
    seed: int = 0
    backchannel_max_words: int = 4  # longer speech over the agent is always an interruption
    fixed_length: bool = False  # never stop before max_reply_tokens (benchmarks on random weights)

    @property
    def min_turn(self) -> int:
        return self.max_reply_tokens + USER_TURN_TOKENS


@dataclass
class _Launch:
    """A decode step launched: its replies, what each runs, and the engine's launch."""

    states: list[Any]  # the replies (llm.stream._Reply)
    requests: list[DecodeRequest]
    launched: Launched


class SinkLLM:
    """A causal LM with RoPE behind an attention-sink cache per session, all sessions on one engine.

    ``slots`` is how many sessions can hold a cache at once (rows of the K/V pool, the largest decode
    batch); ``graphs`` captures the decode step in CUDA graphs on a GPU (see :meth:`warm_up`)."""

    def __init__(self, model: Any, tokenizer: Any, device: str, settings: LLMSettings | None = None, *,
                 slots: int = 4, graphs: bool = True, compile: bool = False, listen_period: float = LISTEN_PERIOD_S,
                 ahead: bool | None = None) -> None:
        self.settings = settings or LLMSettings()
        sliding = getattr(model.config, "sliding_window", None) if model.config.model_type == "mistral" else None
        if sliding and self.settings.window > sliding:
            raise ConfigError(f"llm_window={self.settings.window} exceeds this Mistral model's attention "
                              f"window of {sliding} tokens; use --llm-window {sliding} or less")
        fmt = ChatFormat.from_tokenizer(tokenizer, getattr(model, "generation_config", None))
        self.engine = Engine(model, tokenizer, device, window=self.settings.window, slots=slots,
                             stop_ids=sorted(fmt.stop_ids), graphs=graphs, compile=compile,
                             top_k=self.settings.top_k)
        self.format = fmt
        self.answer_ids = _answer_ids(fmt)
        self.listens = 0  # listen prefills run for all sessions (one per session a listen covers)
        # each tick launches the next decode step of the rows that go on before it returns, so the
        # device runs it while the host hands the tokens over and plans the next tick (``ahead``; by
        # default on a GPU: on the CPU a step runs as it is launched, so it would gain nothing)
        self.run_ahead: RunAhead = RunAhead(self._launch, self._collect, self._book,
                                            lambda reply: reply.stream.replying(reply) and reply.last is not None,
                                            closed=Output((True, None), done=True))
        on = str(device).startswith("cuda") if ahead is None else ahead
        self.scheduler: Scheduler = Scheduler("llm", self.run_ahead.step, device=device, max_batch=slots,
                                              job_budget=4, ahead=self.run_ahead.hooks if on else None)
        # one prefill pass per tick for every session's new words (at most once per listen_period, the
        # ASR's chunk: partials come no faster; never one prefill per partial) and every reply start
        # (which makes the pass due at once)
        self.prefills = self.scheduler.coalesce(self._prefill_batch, period=listen_period)

    @property
    def format(self) -> ChatFormat:
        return self._format

    @format.setter
    def format(self, fmt: ChatFormat) -> None:
        self._format = fmt
        self.engine.set_stop_ids(fmt.stop_ids)  # what a fixed-length reply never samples
        self.engine.set_estimate_ids([fmt.end_of_message])  # what a pass's verdicts estimate

    async def warm_up(self, progress: Callable[[str], None] | None = None) -> None:
        """Capture the decode step for every batch bucket (CUDA graphs; nothing on the CPU), on the
        engine's own thread, before the first session needs it."""
        await self.scheduler.run(self.engine.capture, progress)

    def check_system_prompt(self, system_prompt: str) -> int:
        """Raise :class:`ConfigError` if the window cannot hold this system prompt and one turn;
        returns the sink size in tokens. Blocking (tokenises)."""
        dialogue = DialogueTokens(self.format, system_prompt)
        dialogue.update([])
        sink = dialogue.system_length
        check_window(self.settings.window, sink, self.settings.min_turn)
        return sink

    def new_context(self, system_prompt: str, *, rerotate: bool = True,
                    tools: Sequence[dict[str, Any]] = ()) -> SinkContext:
        """A fresh session state on a free row of the engine (run it on the engine's thread); its
        system block shows ``tools`` (function schemas) when the model calls tools."""
        dialogue = DialogueTokens(self.format, system_prompt, tuple(tools) if self.calls_tools else ())
        return SinkContext.create(self.engine, dialogue, self.settings.window, min_turn=self.settings.min_turn,
                                  rerotate=rerotate)

    @property
    def calls_tools(self) -> bool:
        """Whether its chat template has a tool-call format duplex reads (Qwen2.5's, Llama 3.1's)."""
        return self.format.tool_markers is not None

    def new_stream(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> SinkLLMStream:
        return SinkLLMStream(self, system_prompt, tools=tuple(tools))

    # -- the decode step, run ahead (worker thread; :class:`~duplex.engine.ahead.RunAhead`) -------

    def _launch(self, replies: list[Any]) -> _Launch | None:
        """Launch one decode step of those ``replies`` still open (not waiting for it)."""
        run = [(reply, request) for reply in replies
               for request in [reply.stream.decode_request(reply)] if request is not None]
        if not run:
            return None
        requests = [request for _, request in run]
        return _Launch([reply for reply, _ in run], requests, self.engine.launch(requests))

    def _collect(self, launch: _Launch) -> list[int]:
        return self.engine.collect(launch.launched)

    @staticmethod
    def _book(launch: _Launch, tokens: list[int]) -> list[Output | None]:
        """Commit each reply's token (None: a reply closed meanwhile, whose step is void)."""
        outputs: list[Output | None] = []
        for reply, request, token in zip(launch.states, launch.requests, tokens):
            stream = reply.stream
            if not stream.replying(reply):
                outputs.append(None)
                continue
            done, said = stream.decoded(reply, request, token)
            outputs.append(Output((done, said), done=done))
        return outputs

    def _prefill_batch(self, asks: list[Ask]) -> list[float | None | tuple[bool, int | None]]:
        """Every waiting listen and reply start (worker thread), one pass per round: each plans its
        tokens on its cache (:meth:`SinkLLMStream.plan_listen`, :meth:`SinkLLMStream.plan_start`),
        the tokens of all of them run at once (:meth:`Engine.prefill_rows`), then the reply starts'
        first tokens are sampled together. A session asked for twice has its second ask in the next
        round, after its first; a reply start whose words have no estimate yet is preceded by a
        listen of them (so the estimate is the one a listen gives; the start runs a round later).
        Returns each listen's P(end of message) (or None) and each start's (finished, text). A
        failure re-runs each ask alone (the scheduler), which plans again from the state the failed
        pass left."""
        expanded: list[Ask] = []
        mine: list[int] = []  # where each of ``asks`` is in ``expanded``
        for ask in asks:
            if ask.reply is not None and ask.stream.needs_words(ask.messages) and not any(
                    a.stream is ask.stream and a.reply is None and a.messages == ask.messages for a in expanded):
                expanded.append(Ask(ask.stream, ask.messages))
            mine.append(len(expanded))
            expanded.append(ask)
        rounds: list[list[int]] = []
        asked: dict[int, int] = {}
        for i, ask in enumerate(expanded):
            k = asked.get(id(ask.stream), 0)
            asked[id(ask.stream)] = k + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        results: list[float | None | tuple[bool, int | None]] = [None] * len(expanded)
        for indices in rounds:
            for i, result in zip(indices, self._prefill_round([expanded[i] for i in indices])):
                results[i] = result
        return [results[i] for i in mine]

    def _prefill_round(self, asks: list[Ask]) -> list[float | None | tuple[bool, int | None]]:
        start = time.perf_counter()
        plans = [ask.stream.plan_listen(ask.messages) if ask.reply is None
                 else ask.stream.plan_start(ask.reply, ask.messages) for ask in asks]
        run = [p for p in plans if p is not None and p.tokens]
        logits = self.engine.prefills([(p.ctx.cache, p.tokens) for p in run])
        ran = dict(zip(map(id, run), logits))
        # None: a listen with nothing to estimate; (True, None): a reply closed or superseded while its
        # start waited (both set below for the plans that ran)
        results: list[float | None | tuple[bool, int | None]] = [None if ask.reply is None else (True, None)
                                                                   for ask in asks]
        listens = [(i, plan, plan.commit(ran.get(id(plan)))) for i, plan in enumerate(plans) if isinstance(plan, Listen)]
        read = [scores for _, _, scores in listens if scores is not None]
        starts = [(i, p, p.commit(ran.get(id(p)))) for i, p in enumerate(plans) if isinstance(p, Start)]
        # every listen's estimate and every start's first token from one step and one host copy
        estimates, tokens = self.engine.verdicts(read + [first for _, _, first in starts],
                                                 [None] * len(read) + [p.stream.draw() for _, p, _ in starts])
        found = iter(estimates)
        for i, listen, scores in listens:
            results[i] = listen.estimated(None if scores is None else next(found))
        for (i, p, _), token in zip(starts, tokens[len(read):]):
            results[i] = p.stream.started(p.reply, token)
        share = (time.perf_counter() - start) / len(asks)
        for ask in asks:
            if ask.reply is None:
                ask.stream._listen_s += share
        return results

    def close(self) -> None:
        self.scheduler.close()

    async def aclose(self) -> None:
        """Stop the engine (the agent calls this after closing its sessions)."""
        await self.scheduler.aclose()


def _answer_ids(fmt: ChatFormat) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """First tokens of "yes" and of "no" answers, for the backchannel scoring pass."""
    def first(words: tuple[str, ...]) -> set[int]:
        return {int(fmt.encode(w)[0]) for w in words}

    yes = first(("Yes", "yes", " Yes", " yes"))
    no = first(("No", "no", " No", " no"))
    return tuple(sorted(yes - no)), tuple(sorted(no - yes))
