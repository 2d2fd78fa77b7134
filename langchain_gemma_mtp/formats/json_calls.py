"""JSON tool-call convention for models without a native tool format, and its streaming parser.

The convention: the model writes each call as a line

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

Text outside the markers is content; several calls may follow one another. `parameters` is
accepted in place of `arguments`, and arguments given as a JSON string holding an object are
unwrapped. Slightly broken JSON is repaired when the repair cannot change its meaning: single
quotes, Python's True/False/None, trailing commas, raw newlines in strings, bare keys, and
strings, objects or lists left open at the end.

The model learns the convention from `tools_instruction`, added to the system prompt: it lists
the tools as JSON and shows the call syntax. History is rendered in the same terms by
`inline_tool_history`: an assistant's earlier calls become call lines in its text, and each tool
result becomes a user turn `<tool_response>{"name": ..., "content": ...}</tool_response>`, so any
chat template that knows only user and assistant turns can carry an agent loop.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .streaming import ParsedDelta, Region, StreamingParser
from .values import read_value

TOOL_CALL = Region("<tool_call>", "</tool_call>", streams=False)
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

TOOLS_INSTRUCTION = """\
You can call tools. The tools, as JSON:
{tools}
To call a tool, write a line of exactly this form, with the arguments as a JSON object:
<tool_call>{{"name": "TOOL_NAME", "arguments": {{"ARGUMENT": "VALUE"}}}}</tool_call>
You may write several such lines, one per call. Then stop: each result comes back as
<tool_response>{{"name": "TOOL_NAME", "content": "RESULT"}}</tool_response>"""


def format_json_tool_call(name: str, arguments: Mapping[str, Any]) -> str:
    """Render one call in the convention, as the model is asked to write it."""
    return f"{TOOL_CALL.open}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{TOOL_CALL.close}"


def tools_instruction(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text that teaches the convention and lists `tools` (OpenAI format)."""
    listed = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return TOOLS_INSTRUCTION.format(tools=listed)


def forced_call_prefix(name: str | None) -> str:
    """Output text that commits the model to a call: of tool `name`, or of any tool when None."""
    if name is None:
        return TOOL_CALL.open + '{"name": "'
    return TOOL_CALL.open + json.dumps({"name": name}, ensure_ascii=False)[:-1] + ', "arguments": '


def inline_tool_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with tool calls and tool results written as text in the convention.

    Takes template-ready messages (text content, dict arguments); returns messages with only
    system, user and assistant roles. Consecutive results are left as separate user messages:
    merge them afterwards if the template needs alternating turns.
    """
    result = []
    names_by_id: dict[str | None, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            names_by_id[call.get("id")] = call["function"]["name"]
        if message["role"] == "tool":
            name = message.get("name") or names_by_id.get(message.get("tool_call_id"), "tool")
            body = {"name": name, "content": message["content"]}
            text = TOOL_RESPONSE_OPEN + json.dumps(body, ensure_ascii=False) + TOOL_RESPONSE_CLOSE
            result.append({"role": "user", "content": text})
        elif message.get("tool_calls"):
            calls = [format_json_tool_call(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
            text = "\n".join(t for t in (message["content"], *calls) if t)
            result.append({"role": "assistant", "content": text})
        else:
            result.append(message)
    return result


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
        elif name is not None:
            error = error or self.check_tool_name(name)
        if error is not None:
            self.emit_invalid(delta, name, raw, error)
            return
        assert name is not None  # _load_call names the call whenever it finds no error
        self.emit_call(delta, name, json.dumps(arguments, ensure_ascii=False))
