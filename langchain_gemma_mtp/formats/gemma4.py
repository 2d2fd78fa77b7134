"""Gemma 4 output format: value syntax both ways, the parser's start state, and the streaming parser for content, thought and tool calls."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .streaming import ParsedDelta, Region, StreamingParser
from .values import GEMMA_QUOTE, read_value

CHANNEL = Region("<|channel>", "<channel|>", streams=True)
TOOL_CALL = Region("<|tool_call>", "<tool_call|>", streams=False)
TOOL_RESPONSE_OPEN = "<|tool_response>"
TURN = "<|turn>"
MODEL_TURN = TURN + "model"
# Markers that never occur inside a thought channel a template opened for the model to fill.
_NOT_IN_THOUGHT = ("<|turn>", "<turn|>", TOOL_CALL.open, TOOL_CALL.close, TOOL_RESPONSE_OPEN, "<tool_response|>")

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A thought channel opens with its name on a line of its own. Like vLLM, llama.cpp and ollama,
# only this name line is framing: `<|channel>This\nThat` is all thought.
NAME_LINE = "thought\n"
_CALL_HEAD = re.compile(r"\s*call:\s*([^\s{}]+)\s*(?=\{)")


def forced_call_prefix(name: str | None) -> str:
    """Output text that commits the model to a call: of tool `name`, or of any tool when None."""
    return TOOL_CALL.open + "call:" + (f"{name}{{" if name is not None else "")


def forced_opening(forced: str, in_thought: bool) -> str:
    """The forced output text (a call prefix, JSON's `{`) to put after a prompt.

    A prompt that ends inside an open thought channel gets the channel closed first: the
    forced text belongs to the answer, and an empty thought followed by the answer is the
    shape the 26B/31B templates themselves render when thinking is off.
    """
    return CHANNEL.close + forced if forced and in_thought else forced


def prompt_ends_in_thought(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves the model inside an open thought channel.

    True when the last `<|channel>` after the last `<|turn>model` is neither closed nor
    followed by any marker a template writes outside a channel (a turn, a call, a tool
    response): the July 2026 template, thinking on, ends prompts after tool responses with
    `...<tool_response|><|channel>thought\n`. Decided from the text itself, for any template.
    """
    turn = prompt_text.rfind(MODEL_TURN)
    if turn < 0:
        return False
    opened = prompt_text.rfind(CHANNEL.open, turn)
    if opened < 0:
        return False
    rest = prompt_text[opened + len(CHANNEL.open) :]
    return not any(marker in rest for marker in (CHANNEL.close, *_NOT_IN_THOUGHT))


def to_gemma4_value(obj: Any) -> str:
    """Render a JSON value in Gemma 4 syntax, as the model writes it and our test template renders it.

    Strings are wrapped in the `<|"|>` token with no escaping (a string that itself contains
    the token cannot round-trip, in the real templates either); numbers, booleans and null are
    bare; keys are sorted, bare when they are identifiers and quoted otherwise. (The published
    July 2026 template writes every key bare, `a b:` included; the parser reads both forms.)
    """
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, str):
        return GEMMA_QUOTE + obj + GEMMA_QUOTE
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"{obj} is not a JSON number")
        return repr(obj)
    if isinstance(obj, Mapping):
        items = []
        for key in sorted(obj):
            if not isinstance(key, str):
                raise TypeError(f"object keys must be strings, got {key!r}")
            rendered_key = key if _BARE_KEY.fullmatch(key) else to_gemma4_value(key)
            items.append(f"{rendered_key}:{to_gemma4_value(obj[key])}")
        return "{" + ",".join(items) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(to_gemma4_value(item) for item in obj) + "]"
    raise TypeError(f"cannot render {type(obj).__name__} as a Gemma 4 value")


def parse_gemma4_value(text: str) -> Any:
    """Parse Gemma 4 value syntax into Python objects; raises ValueError saying where it went wrong.

    Keys may be bare (any text up to the colon: `k-1`, `a b`) or quoted (with the quote token
    or JSON quotes); an unquoted value that is not a number, `true`/`false`/`null` (or
    Python's `True`/`False`/`None`) is a string; whitespace and a trailing comma are tolerated.
    """
    return read_value(text, bare_strings=True)


class Gemma4OutputParser(StreamingParser):
    """Streaming parser for Gemma 4 model output (decoded with special tokens kept).

    Content streams until `<|tool_call>` or `<|channel>`. A channel's text streams as
    reasoning without the channel's framing: the name line (`thought\n`, after any doubled
    `<|channel>`) and the one newline before `<channel|>` are left out, so replaying it as
    the templates do (`<|channel>thought\n` + reasoning + `\n<channel|>`) gives back exactly
    what the model wrote. An empty channel yields nothing. Each
    `<|tool_call>call:NAME{...}<tool_call|>` becomes a tool call with JSON arguments, emitted
    once it closes (or, complete, when the output ends before its close marker); a call that
    does not parse, names an undeclared tool, or is cut off becomes an InvalidToolCall carrying
    its raw text. A stray `<channel|>`, `<tool_call|>` or `<|tool_response>` outside a channel
    or call is dropped from the content.

    `in_thought` starts inside a thought channel whose name line the prompt already wrote
    (see `prompt_ends_in_thought`). `thinking` records whether the prompt asked for thinking;
    the parse is the same either way: a channel the model opens with thinking off is routed to
    reasoning rather than leaking its markers into the content.
    """

    regions = (CHANNEL, TOOL_CALL)
    drops = (CHANNEL.close, TOOL_CALL.close, TOOL_RESPONSE_OPEN)

    def __init__(self, tool_names: set[str] | None = None, thinking: bool = False, in_thought: bool = False) -> None:
        super().__init__(tool_names)
        self.thinking = thinking
        self._channel_head: str | None = None  # a channel's text while its name line is undecided
        self._held_newline = False  # a thought's last "\n", framing if `<channel|>` follows
        if in_thought:
            self.enter(CHANNEL)
            self._channel_head = None  # the prompt wrote the name line

    def region_start(self, region: Region) -> None:
        if region is CHANNEL:
            self._channel_head = ""
            self._held_newline = False

    def region_text(self, region: Region, text: str, delta: ParsedDelta) -> None:
        if self._channel_head is not None:
            after = self._after_name_line(self._channel_head + text)
            if after is None:
                return
            text = after
        if not text:
            return
        if self._held_newline:
            text = "\n" + text
        self._held_newline = text.endswith("\n")
        delta.reasoning += text[:-1] if self._held_newline else text

    def _after_name_line(self, head: str) -> str | None:
        """The thought text after the channel's name line; None while that line is undecided."""
        while head.startswith(CHANNEL.open):  # a doubled `<|channel><|channel>thought`
            head = head[len(CHANNEL.open) :]
        if NAME_LINE.startswith(head) or CHANNEL.open.startswith(head):
            self._channel_head = head  # still reading the name line, or a repeated open marker
            return None
        self._channel_head = None
        return head.removeprefix(NAME_LINE)

    def region_end(self, region: Region, body: str, closed: bool, delta: ParsedDelta) -> None:
        if region is CHANNEL:
            # A name with no newline (`<|channel>thought<channel|>`) is an empty channel.
            if self._held_newline and not closed:
                delta.reasoning += "\n"  # the output ended: no close marker made it framing
            self._channel_head, self._held_newline = None, False
            return
        raw = TOOL_CALL.open + body + (TOOL_CALL.close if closed else "")
        head = _CALL_HEAD.match(body)
        if head is None:
            reason = "expected call:NAME{...} inside the tool call"
            self.emit_invalid(delta, None, raw, reason if closed else f"tool call not closed with {TOOL_CALL.close}")
            return
        name = head.group(1)
        try:
            arguments = parse_gemma4_value(body[head.end() :])
        except ValueError as exc:
            # Cut off, the text is incomplete rather than wrong: say so rather than where it broke.
            reason = f"arguments do not parse: {exc}" if closed else f"tool call not closed with {TOOL_CALL.close}"
            self.emit_invalid(delta, name, raw, reason)
            return
        error = self.check_tool_name(name)
        if error:
            self.emit_invalid(delta, name, raw, error)
            return
        self.emit_call(delta, name, json.dumps(arguments, ensure_ascii=False))
