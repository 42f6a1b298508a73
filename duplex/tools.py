"""Tools the agent can call while it speaks: what one is, the decorator that makes one from a typed
async function, argument checks, and loading them for the CLI (``--tools module:attr``).

A reply that calls a tool speaks what it said before the call, runs the tool without holding up
listening or other sessions (a short holding phrase once if it takes longer than
``AgentConfig.tool_hold_s``), and goes on from the tool's result, which enters the LLM's context as
the tool's message. A barge-in cancels the tool (``cancel_on_interrupt``, the default) or lets it
finish, its result recorded as never spoken. Bad arguments, an unknown tool, a failure or a timeout
are told to the model as the result (``{"error": ...}``), once; the session goes on. See
:meth:`duplex.session.Session` (its reply loop) and the record's :class:`duplex.conversation.ToolUse`.

    @tool
    async def weather(city: str, unit: Literal["C", "F"] = "C") -> dict:
        '''The current weather in a city.'''
        ...

    agent = await Agent.load(profile="fake", tools=[weather])
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import types
import typing
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

from duplex.errors import ConfigError

MAX_CALLS_PER_REPLY = 4  # a model that keeps calling tools is stopped after this many in one reply


@dataclass(frozen=True)
class ToolCall:
    """A call the LLM made: a tool's name and its arguments (a JSON object, or the text it wrote
    when that was not one: the call then fails with a message saying so)."""

    call_id: str
    name: str
    arguments: dict[str, Any] | str


@dataclass(frozen=True)
class Tool:
    """An async function the agent may call: its name, what it does and a JSON schema of its
    arguments (an object), as the LLM is shown them."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Awaitable[Any]]
    cancel_on_interrupt: bool = True  # a barge-in cancels it; False: it finishes, its result recorded unspoken
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"a tool name is letters, digits, '_' and '-', got {self.name!r}")
        if not inspect.iscoroutinefunction(self.fn):
            raise ConfigError(f"tool {self.name!r}: its function must be async (async def), got {self.fn!r}")
        if self.parameters.get("type") != "object":
            raise ConfigError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")

    def schema(self) -> dict[str, Any]:
        """The tool as chat templates take it (OpenAI's function format)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               list: "array", tuple: "array", dict: "object"}


def _json_schema(hint: Any, where: str) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is Literal:
        values = list(typing.get_args(hint))
        return {"enum": values}
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1:
            return _json_schema(options[0], where)
        return {"anyOf": [_json_schema(a, where) for a in options]}
    if origin in (list, tuple, Sequence):
        args = typing.get_args(hint)
        return {"type": "array", **({"items": _json_schema(args[0], where)} if args else {})}
    if origin is dict:
        return {"type": "object"}
    raise ConfigError(f"{where}: cannot describe type {hint!r} to the model; use str, int, float, bool, "
                      "Literal[...], list[...] or dict, or give parameters= yourself")


def tool(fn: Callable[..., Awaitable[Any]] | None = None, *, name: str | None = None,
         description: str | None = None, cancel_on_interrupt: bool = True,
         timeout_s: float = 30.0) -> Any:
    """Make a :class:`Tool` of an async function: its name, its docstring's first paragraph as the
    description, and the JSON schema of its typed parameters (those without a default required)."""

    def make(fn: Callable[..., Awaitable[Any]]) -> Tool:
        where = f"tool {name or fn.__name__!r}"
        hints = typing.get_type_hints(fn)
        properties: dict[str, Any] = {}
        required: list[str] = []
        for pname, param in inspect.signature(fn).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ConfigError(f"{where}: *args and **kwargs cannot be described to the model")
            if pname not in hints:
                raise ConfigError(f"{where}: parameter {pname!r} needs a type annotation")
            properties[pname] = _json_schema(hints[pname], where)
            if param.default is param.empty:
                required.append(pname)
        doc = inspect.getdoc(fn) or ""
        text = description or doc.split("\n\n")[0].replace("\n", " ").strip()
        if not text:
            raise ConfigError(f"{where}: give it a docstring (or description=): the model needs to know what it does")
        return Tool(name=name or fn.__name__, description=text,
                    parameters={"type": "object", "properties": properties, "required": required},
                    fn=fn, cancel_on_interrupt=cancel_on_interrupt, timeout_s=timeout_s)

    return make(fn) if fn is not None else make


def check_arguments(t: Tool, arguments: dict[str, Any] | str) -> dict[str, Any]:
    """The call's arguments if they fit the tool's schema; ValueError saying what does not."""
    if isinstance(arguments, str):
        raise ValueError(f"the arguments of {t.name} are not a JSON object: {arguments[:200]!r}")
    props = t.parameters.get("properties", {})
    missing = [p for p in t.parameters.get("required", []) if p not in arguments]
    if missing:
        raise ValueError(f"{t.name} needs {', '.join(missing)}")
    unknown = [a for a in arguments if a not in props]
    if unknown:
        raise ValueError(f"{t.name} takes no argument {', '.join(unknown)} (it takes {', '.join(props) or 'none'})")
    for key, value in arguments.items():
        problem = _mismatch(props[key], value)
        if problem:
            raise ValueError(f"{t.name}: argument {key} {problem}")
    return arguments


def _mismatch(schema: dict[str, Any], value: Any) -> str | None:
    if "enum" in schema:
        return None if value in schema["enum"] else f"must be one of {schema['enum']}, got {value!r}"
    if "anyOf" in schema:
        return None if any(_mismatch(s, value) is None for s in schema["anyOf"]) else f"has the wrong type: {value!r}"
    kind = schema.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict)}
    if kind in checks and not checks[kind](value):
        return f"must be a {kind}, got {value!r}"
    return None


class ToolCallText:
    """Finds tool calls in a reply's generated text, piece by piece: text before ``open_`` is speech;
    what stands between ``open_`` and ``close`` (``<tool_call>`` ... ``</tool_call>`` in Qwen's
    template) is the call. Text that may be the start of ``open_`` is held back until it is not.
    Without markers (``"", ""``: Llama 3.1's bare JSON) a reply that begins with ``{`` is a call,
    whole; any other reply is speech."""

    def __init__(self, open_: str, close: str) -> None:
        self.open, self.close = open_, close
        self._buffer = ""
        self.in_call = False
        self._bare = not open_ and not close
        self._speech = False  # (bare) the reply began as words: no call in it

    def feed(self, text: str) -> tuple[str, ToolCall | None]:
        """(speech to pass on, the call completed by this text, if any: nothing after it counts)."""
        if self._bare:
            return self._feed_bare(text)
        self._buffer += text
        if not self.in_call:
            at = self._buffer.find(self.open)
            if at < 0:
                keep = next((k for k in range(min(len(self.open) - 1, len(self._buffer)), 0, -1)
                             if self._buffer.endswith(self.open[:k])), 0)
                speech, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                return speech, None
            speech, self._buffer, self.in_call = self._buffer[:at], self._buffer[at + len(self.open):], True
        else:
            speech = ""
        at = self._buffer.find(self.close)
        if at < 0:
            return speech, None
        body, self._buffer, self.in_call = self._buffer[:at], "", False
        return speech, parse_call(body)

    def _feed_bare(self, text: str) -> tuple[str, ToolCall | None]:
        if self._speech:
            return text, None
        self._buffer += text
        start = self._buffer.lstrip()
        if not start:
            return "", None
        if not start.startswith("{"):
            self._speech, speech, self._buffer = True, self._buffer, ""
            return speech, None
        self.in_call = True
        try:  # the call ends where its JSON object does (the stop token follows it)
            json.loads(start)
        except json.JSONDecodeError:
            return "", None
        self._buffer, self.in_call = "", False
        return "", parse_call(start)

    def end(self) -> tuple[str, ToolCall | None]:
        """The reply ended: text held back is speech; a call left open is parsed as it stands."""
        rest, self._buffer = self._buffer, ""
        if self.in_call:
            self.in_call = False
            return "", parse_call(rest)
        return rest, None


def parse_call(body: str) -> ToolCall:
    """``{"name": ..., "arguments": {...}}`` (arguments may come as a JSON string); a body that is not
    one is kept as text, so running it tells the model what was wrong."""
    try:
        data = json.loads(body.strip())
    except json.JSONDecodeError:
        return ToolCall("", "?", body.strip())
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCall("", "?", body.strip())
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return ToolCall("", data["name"], arguments if isinstance(arguments, (dict, str)) else json.dumps(arguments))


@dataclass
class ToolOutcome:
    """What running one call gave: the text the model is told, and how it went."""

    output: str
    error: str | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


_RUNNING: ContextVar[ToolCall | None] = ContextVar("duplex_tool_call", default=None)


def current_call() -> ToolCall:
    """Inside a tool's function, while it runs: the call it answers (its ``call_id`` is the one the
    events and the record name; a tool run by a Realtime client waits for the output of that id)."""
    call = _RUNNING.get()
    if call is None:
        raise RuntimeError("current_call() is for a tool's function, while the agent runs it")
    return call


async def run_call(tools: dict[str, Tool], call: ToolCall) -> ToolOutcome:
    """Run ``call``; every failure becomes the output ``{"error": ...}`` (the model is told, once)."""
    loop = asyncio.get_running_loop()
    start = loop.time()

    def failed(message: str) -> ToolOutcome:
        return ToolOutcome(json.dumps({"error": message}), message, loop.time() - start)

    t = tools.get(call.name)
    if t is None:
        return failed(f"there is no tool {call.name!r}; the tools are: {', '.join(tools) or 'none'}")
    try:
        arguments = check_arguments(t, call.arguments)
    except ValueError as exc:
        return failed(str(exc))
    running = _RUNNING.set(call)
    try:
        result = await asyncio.wait_for(t.fn(**arguments), t.timeout_s)
    except asyncio.TimeoutError:
        return failed(f"{t.name} took longer than {t.timeout_s:g} s")
    except Exception as exc:  # the tool's own failure: the model is told
        return failed(f"{t.name} failed: {type(exc).__name__}: {exc}")
    finally:
        _RUNNING.reset(running)
    try:
        output = result if isinstance(result, str) else json.dumps(result)
    except (TypeError, ValueError):
        output = str(result)
    return ToolOutcome(output, None, loop.time() - start)


def load_tools(specs: Iterable[str]) -> list[Tool]:
    """``--tools module:attr`` (repeatable): a Tool, an async function (made one with :func:`tool`), or
    a list of either."""
    out: list[Tool] = []
    for spec in specs:
        module_name, sep, attr = spec.partition(":")
        if not sep or not module_name or not attr:
            raise ConfigError(f"--tools takes module:attribute (e.g. mytools:TOOLS), got {spec!r}")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"--tools {spec}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from None
        if not hasattr(module, attr):
            raise ConfigError(f"--tools {spec}: {module_name} has no {attr!r}")
        value = getattr(module, attr)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            out.append(item if isinstance(item, Tool) else tool(item))
    tool_table(out)
    return out


def tool_table(tools: Iterable[Tool]) -> dict[str, Tool]:
    """``tools`` by name; ConfigError naming the names two of them share."""
    tools = list(tools)
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ConfigError(f"two tools share a name: {sorted({n for n in names if names.count(n) > 1})}")
    return {t.name: t for t in tools}
