"""JSON tool-call convention for models without a native tool format, and its streaming parser.

The convention: the model writes each call as a line

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

Text outside the markers is content; several calls may follow one another. `parameters` is
accepted in place of `arguments`, and arguments given as a JSON string holding an object are
unwrapped. Slightly broken JSON is repaired when the repair cannot change its meaning: single
quotes, Python's True/False/None, trailing commas, raw newlines in strings, bare keys, and
strings, objects or lists left open at the end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .streaming import ParsedDelta, Region, StreamingParser
from .values import read_value

TOOL_CALL = Region("<tool_call>", "</tool_call>", streams=False)


def format_json_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """Render one call in the convention, as the model is asked to write it."""
    return f"{TOOL_CALL.open}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL.close}"


def _load_call(body: str) -> tuple[str | None, dict[str, Any] | None, str | None]:
    """(name, arguments, error) of a call body; the name is kept whenever it can be read."""
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        # No JSON-repair library is installed; our lenient reader does the few safe repairs.
        try:
            call = read_value(body, close_unterminated=True)
        except ValueError as exc:
            return None, None, f"tool call is not JSON: {exc}"
    if not isinstance(call, dict):
        return None, None, "tool call must be a JSON object with name and arguments"
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return None, None, 'tool call has no "name" string'
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return name, None, f"arguments string is not JSON: {exc}"
    if not isinstance(arguments, dict):
        return name, None, f"arguments must be an object, got {type(arguments).__name__}"
    return name, arguments, None


class JsonToolCallParser(StreamingParser):
    """Streaming parser for the `<tool_call>{json}</tool_call>` convention; same deltas as Gemma4OutputParser."""

    regions = (TOOL_CALL,)

    def region_end(self, region: Region, body: str, closed: bool, delta: ParsedDelta) -> None:
        raw = TOOL_CALL.open + body + (TOOL_CALL.close if closed else "")
        name, arguments, error = _load_call(body)
        if not closed:
            error = f"tool call not closed with {TOOL_CALL.close}"
        elif error is None:
            error = self.check_tool_name(name)
        if error is not None:
            self.emit_invalid(delta, name, raw, error)
            return
        self.emit_call(delta, name, json.dumps(arguments, ensure_ascii=False))
