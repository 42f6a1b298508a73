"""The model's chat template, taken apart into per-message wrappers, and dialogue tokenisation.

:class:`ChatFormat` renders the real chat template once with placeholder contents and cuts it into
the system block, a ``(prefix, suffix)`` pair per role and the generation prompt. A dialogue is then
``system + wrap(m1) + wrap(m2) + ...``, each message tokenised on its own, which equals rendering
the whole dialogue for message-local templates (ChatML, Llama 3; checked at load) and lets the
stream re-tokenise only the messages that changed. The last user message can be rendered *open*
(without its suffix), so the next-token distribution after it gives the probability that the
message is complete: the suffix's first token (``<|im_end|>``, ``<|eot_id|>``).

:class:`DialogueTokens` keeps the token ids of each rendered segment and says where a new rendering
first differs from the previous one.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from duplex.errors import ConfigError
from duplex.stages import Dialogue, Message, frozen

log = logging.getLogger(__name__)

# Options every rendering passes (templates ignore those they do not read): no thinking block (Qwen3),
# the tools in the system block rather than the first user message (Llama 3.1), so it stays message-local.
TEMPLATE_OPTIONS: dict[str, Any] = {"enable_thinking": False, "tools_in_user_message": False}
_A = "\ue000"  # placeholder contents: private-use characters no template touches
_B = "\ue001"
ROLES = ("user", "assistant")
# what a call message and a tool message are rendered after (ChatFormat.call_base, .tool_base)
_CALL_CONTEXT: list[dict[str, Any]] = [{"role": "system", "content": _A}, {"role": "user", "content": _B}]
_TOOL_CONTEXT: list[dict[str, Any]] = [*_CALL_CONTEXT, {"role": "assistant", "content": _A}]


@dataclass(frozen=True)
class ChatFormat:
    """The chat template of one tokenizer, as strings to put around each message."""

    tokenizer: Any
    system_text: str  # the rendered system block, with {system} already substituted by render_system
    wrappers: dict[str, tuple[str, str]]  # role -> (prefix, suffix)
    generation_prompt: str
    end_of_message: int  # first token of the user suffix: "the user's message is complete"
    stop_ids: frozenset[int]  # tokens that end a reply
    # Tool calls, where the template has them: the markers around a call in the assistant's text
    # (Qwen2.5's <tool_call> JSON </tool_call>; ("", "") for Llama 3.1's bare JSON, the whole
    # message), and the renderings a call message and a tool message follow (the template itself
    # renders those two, after them: Llama 3.1's passes a result through tojson); None: no tools.
    tool_markers: tuple[str, str] | None = None
    call_base: str = ""
    tool_base: str = ""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, generation_config: Any = None) -> ChatFormat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the LLM's tokenizer has no chat template; use an instruct/chat checkpoint")

        def render(messages: list[dict[str, Any]], gen: bool = False) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                                 **TEMPLATE_OPTIONS)

        system = [{"role": "system", "content": _A}]
        s = render(system)
        a = render(_CALL_CONTEXT)  # system, user
        b = render(_TOOL_CONTEXT)  # system, user, assistant
        g = render(_CALL_CONTEXT, gen=True)
        if not (a.startswith(s) and b.startswith(a) and g.startswith(a) and s.count(_A) == 1):
            raise ConfigError("the LLM's chat template does not render messages one after another; "
                              "duplex.llm needs a message-local template (ChatML, Llama 3, ...)")
        user_prefix, _, user_suffix = a[len(s):].partition(_B)
        asst_prefix, _, asst_suffix = b[len(a):].partition(_A)
        fmt_tokens = tokenizer(user_suffix, add_special_tokens=False)["input_ids"]
        if not fmt_tokens:
            raise ConfigError("the chat template puts nothing after a user message, so the end of a "
                              "message cannot be read from the model")
        stop = {tokenizer(asst_suffix, add_special_tokens=False)["input_ids"][0]}
        for extra in (getattr(tokenizer, "eos_token_id", None),
                      getattr(generation_config, "eos_token_id", None)):
            if isinstance(extra, int):
                stop.add(extra)
            elif extra:
                stop.update(int(t) for t in extra)
        wrappers = {"user": (user_prefix, user_suffix), "assistant": (asst_prefix, asst_suffix)}
        markers = _tool_format(render, system, a, b, asst_prefix, asst_suffix)
        fmt = cls(tokenizer=tokenizer, system_text=s, wrappers=wrappers, generation_prompt=g[len(a):],
                  end_of_message=fmt_tokens[0], stop_ids=frozenset(stop), tool_markers=markers, call_base=a,
                  tool_base=b)
        fmt._check_local(render)
        return fmt

    def _check_local(self, render: Any) -> None:
        sample = [Message("user", "Hello there."), Message("assistant", "Hi! How can I help?"),
                  Message("user", "Tell me a joke.")]
        whole = render([{"role": "system", "content": "Be brief."}]
                       + [{"role": m.role, "content": m.content} for m in sample], True)
        pieces = self.render_system("Be brief.") + "".join(self.render(m) for m in sample)
        if whole != pieces + self.generation_prompt:
            log.warning("the chat template is not message-local; duplex.llm renders each message with "
                        "the wrappers of its role, which may differ slightly from the template")

    def render_system(self, system_prompt: str, tools: Sequence[dict[str, Any]] = ()) -> str:
        """The system block; with ``tools`` (OpenAI function schemas), as the template shows them."""
        if not tools:
            return self.system_text.replace(_A, system_prompt.strip())
        return self.tokenizer.apply_chat_template([{"role": "system", "content": system_prompt.strip()}],
                                                  tools=list(tools), tokenize=False, add_generation_prompt=False,
                                                  **TEMPLATE_OPTIONS)

    def render(self, message: Message, *, open_: bool = False) -> str:
        """One message with its wrappers; ``open_`` leaves the suffix off (the message goes on). An
        assistant message that calls a tool is rendered by the template (its call format)."""
        if message.tool_call is not None:
            call = message.tool_call
            return self._rendered_after(_CALL_CONTEXT, self.call_base, {
                "role": "assistant", "content": message.content.strip(),
                "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}]})
        if message.role == "tool" and self.tool_markers is not None:
            return self._rendered_after(_TOOL_CONTEXT, self.tool_base,
                                        {"role": "tool", "content": message.content.strip()})
        if message.role not in self.wrappers:
            raise ValueError(f"unknown message role {message.role!r}; expected one of {', '.join(ROLES)}")
        prefix, suffix = self.wrappers[message.role]
        return prefix + message.content.strip() + ("" if open_ else suffix)

    def _rendered_after(self, context: list[dict[str, Any]], base: str, message: dict[str, Any]) -> str:
        """``message`` as the template itself writes it after ``context`` (which it renders as ``base``)."""
        whole = self.tokenizer.apply_chat_template([*context, message], tokenize=False, add_generation_prompt=False,
                                                   **TEMPLATE_OPTIONS)
        return whole[len(base):]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)


def _tool_format(render: Any, system: list[dict[str, Any]], a: str, b: str, asst_prefix: str,
                 asst_suffix: str) -> tuple[str, str] | None:
    """The markers around a tool call in an assistant message (Qwen2.5's ``<tool_call>`` ...
    ``</tool_call>``; ``("", "")`` where the call is the whole message, bare JSON, as in Llama 3.1's),
    if the template renders a call message and a tool message message-locally; None otherwise."""
    call = {"type": "function", "function": {"name": "tool_name", "arguments": {"key": 1}}}
    try:
        with_call = render(system + [{"role": "user", "content": _B},
                                     {"role": "assistant", "content": _A, "tool_calls": [call]}])
        with_tool = render(system + [{"role": "user", "content": _B}, {"role": "assistant", "content": _A},
                                     {"role": "tool", "content": "result"}])
    except Exception:  # jinja raising on a role or field it does not know: no tools
        return None
    body = with_call[len(a):] if with_call.startswith(a) else ""
    if not (body.startswith(asst_prefix) and body.endswith(asst_suffix)) or not with_tool.startswith(b) \
            or "result" not in with_tool[len(b):]:
        return None
    text = body[len(asst_prefix):len(body) - len(asst_suffix)].replace(_A, "")  # (Llama 3.1 drops the words)
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or "tool_name" not in text[start:end + 1]:
        return None
    open_, close = text[:start].strip(), text[end + 1:].strip()
    if bool(open_) != bool(close):
        return None
    return open_, close


@dataclass
class DialogueTokens:
    """The token ids of a rendered dialogue, kept per segment: system, each message, generation prompt.

    :meth:`update` re-renders a new version of the dialogue, re-tokenising only segments that
    changed, and returns the dialogue index of the first token that differs from the previous version.
    Segments are recognised by role, a hash of their text and whether they are open, so the text is
    not copied; :meth:`prune` drops the token ids of segments the cache has evicted (they are
    re-tokenised from the latest messages if a rebuild ever needs them), so what is kept per message
    is a few integers however long the dialogue runs. Given the conversation record's
    :class:`~duplex.stages.Dialogue`, an update compares only its tail while its settled part is the
    one seen before: per ASR partial, the work does not grow with the dialogue.
    """

    fmt: ChatFormat
    system_prompt: str
    tools: tuple[dict[str, Any], ...] = ()  # the tools the system block shows (function schemas)
    keys: list[tuple[str, int, bool]] = field(default_factory=list)  # (role, hash(content), open)
    segments: list[np.ndarray | None] = field(default_factory=list)  # None: pruned
    sizes: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # dialogue index of each segment's first token
    length: int = 0
    _messages: Sequence[Message] = ()
    _settled: tuple[Message, ...] | None = None  # the Dialogue part keys [1, 1 + len) were made from
    _pruned: int = 1  # segments [1, _pruned) may be pruned

    def update(self, messages: Sequence[Message], *, open_last: bool = False,
               generation_prompt: bool = False) -> int:
        # A Dialogue whose `settled` part is the one the keys already hold (every partial of a turn)
        # is compared from its tail on: the work does not grow with the dialogue. `settled` never
        # holds the last message, so none of its keys is open.
        n = len(messages)
        rest: Sequence[Message]
        if isinstance(messages, Dialogue) and messages.settled is self._settled:
            first = len(messages.settled)  # messages [0, first) are known: keys [1, first] hold them
            base = first + 1  # the index in self.keys of keys[0]
            keys, rest = [], messages.tail
        else:
            first = base = 0
            keys, rest = [("system", hash(self.system_prompt), False)], messages
            self._settled = messages.settled if isinstance(messages, Dialogue) else None
        self._messages = frozen(messages)  # references only: for re-tokenising pruned segments
        keys += [(m.role, hash(m.content) if m.tool_call is None else hash((m.content, repr(m.tool_call))),
                  open_last and i == n - 1) for i, m in enumerate(rest, start=first)]
        if generation_prompt:
            keys.append(("generation", 0, False))
        same = base
        while same - base < len(keys) and same < len(self.keys) and keys[same - base] == self.keys[same]:
            same += 1
        old = self.segments[same] if same < len(self.segments) else None
        del self.keys[same:], self.segments[same:], self.sizes[same:], self.starts[same:]
        self._pruned = min(self._pruned, max(1, same))
        self.length = self.starts[-1] + self.sizes[-1] if self.starts else 0
        first_change = self.length
        for i, key in enumerate(keys[same - base:]):
            seg = self._encode(same + i, key)
            if i == 0 and old is not None:
                n_old = min(len(old), len(seg))
                first_change += int(np.argmin(np.append(old[:n_old] == seg[:n_old], False)))
            self.keys.append(key)
            self.segments.append(seg)
            self.sizes.append(len(seg))
            self.starts.append(self.length)
            self.length += len(seg)
        return first_change

    def _encode(self, index: int, key: tuple[str, int, bool]) -> np.ndarray:
        role, _, open_ = key
        if index == 0:
            return self.fmt.encode(self.fmt.render_system(self.system_prompt, self.tools))
        if role == "generation":
            return self.fmt.encode(self.fmt.generation_prompt)
        return self.fmt.encode(self.fmt.render(self._messages[index - 1], open_=open_))

    def _segment(self, index: int) -> np.ndarray:
        seg = self.segments[index]
        return seg if seg is not None else self._encode(index, self.keys[index])

    def prune(self, before: int) -> None:
        """Forget the token ids of messages that end before dialogue index ``before``."""
        i = self._pruned
        while i < len(self.starts) and self.starts[i] + self.sizes[i] <= before:
            self.segments[i] = None
            i += 1
        self._pruned = i

    def retained(self) -> int:
        """How many token ids are kept (for tests: bounded by the window plus a message or two)."""
        return sum(len(seg) for seg in self.segments if seg is not None)

    @property
    def system_length(self) -> int:
        return self.sizes[0] if self.sizes else 0

    def ids(self, start: int, end: int | None = None) -> np.ndarray:
        """Dialogue tokens ``[start, end)``."""
        end = self.length if end is None else end
        if start >= end:
            return np.zeros(0, dtype=np.int64)
        first = max(0, int(np.searchsorted(self.starts, start, side="right")) - 1)
        parts, i = [], first
        while i < len(self.starts) and self.starts[i] < end:
            s = self.starts[i]
            parts.append(self._segment(i)[max(0, start - s): end - s])
            i += 1
        return np.concatenate(parts)

    def boundaries(self) -> list[int]:
        """Dialogue indices where a message starts (the places eviction prefers to cut)."""
        return list(self.starts[1:])

    def next_boundary(self, index: int) -> int | None:
        """The first message start at or after dialogue index ``index``, if any."""
        i = bisect.bisect_left(self.starts, index, lo=1)
        return self.starts[i] if i < len(self.starts) else None
