"""Gemma 4 output format: value syntax both ways, and the streaming parser for content, thought and tool calls."""

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

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A channel opens with its name on a line of its own: `<|channel>thought\n`.
_CHANNEL_NAME = re.compile(r"\w*")
_CALL_HEAD = re.compile(r"\s*call:\s*([^\s{}]+)\s*(?=\{)")


def forced_call_prefix(name: str | None) -> str:
    """Output text that commits the model to a call: of tool `name`, or of any tool when None."""
    return TOOL_CALL.open + "call:" + (f"{name}{{" if name is not None else "")


def to_gemma4_value(obj: Any) -> str:
    """Render a JSON value in Gemma 4 syntax, exactly as our chat template does.

    Strings are wrapped in the `<|"|>` token with no escaping (a string that itself contains
    the token cannot round-trip, in the real template either); numbers, booleans and null are
    bare; keys are sorted, bare when they are identifiers and quoted otherwise.
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

    Keys may be bare or quoted (with the quote token or JSON quotes), whitespace and a
    trailing comma are tolerated.
    """
    return read_value(text)


class Gemma4OutputParser(StreamingParser):
    """Streaming parser for Gemma 4 model output (decoded with special tokens kept).

    Content streams until `<|tool_call>` or `<|channel>`. A channel's text (after its name
    line, `thought\\n`) streams as reasoning; an empty one yields nothing. Each
    `<|tool_call>call:NAME{...}<tool_call|>` becomes a tool call with JSON arguments, emitted
    once it closes; a call that does not parse, names an undeclared tool, or never closes
    becomes an InvalidToolCall carrying its raw text.

    `thinking` records whether the prompt asked for thinking. The parse is the same either
    way: with thinking on the model opens its own thought channel, and with it off the
    template has pre-closed one, so a channel the model still opens is routed to reasoning
    rather than leaking its markers into the content.
    """

    regions = (CHANNEL, TOOL_CALL)

    def __init__(self, tool_names: set[str] | None = None, thinking: bool = False) -> None:
        super().__init__(tool_names)
        self.thinking = thinking
        self._channel_head: str | None = None  # text seen while the channel's name line is incomplete

    def region_start(self, region: Region) -> None:
        if region is CHANNEL:
            self._channel_head = ""

    def region_text(self, region: Region, text: str, delta: ParsedDelta) -> None:
        if self._channel_head is None:
            delta.reasoning += text
            return
        head = self._channel_head + text
        name_end = _CHANNEL_NAME.match(head).end()
        if name_end == len(head):
            self._channel_head = head  # still reading the name
            return
        self._channel_head = None
        # A newline after the name ends the header; anything else means there was no header line.
        delta.reasoning += head[name_end + 1 :] if head[name_end] == "\n" else head

    def region_end(self, region: Region, body: str, closed: bool, delta: ParsedDelta) -> None:
        if region is CHANNEL:
            # A bare name with no newline (`<|channel>thought<channel|>`) is an empty channel.
            self._channel_head = None
            return
        raw = TOOL_CALL.open + body + (TOOL_CALL.close if closed else "")
        head = _CALL_HEAD.match(body)
        name = head.group(1) if head else None
        if not closed:
            self.emit_invalid(delta, name, raw, f"tool call not closed with {TOOL_CALL.close}")
            return
        if head is None:
            self.emit_invalid(delta, None, raw, "expected call:NAME{...} inside the tool call")
            return
        error = self.check_tool_name(name)
        if error:
            self.emit_invalid(delta, name, raw, error)
            return
        try:
            arguments = parse_gemma4_value(body[head.end() :])
        except ValueError as exc:
            self.emit_invalid(delta, name, raw, f"arguments do not parse: {exc}")
            return
        self.emit_call(delta, name, json.dumps(arguments, ensure_ascii=False))
