"""Output-format parsers by model family: Gemma 4's native format and a JSON tool-call convention."""

from .gemma4 import Gemma4OutputParser, parse_gemma4_value, prompt_ends_in_thought, to_gemma4_value
from .json_calls import JsonToolCallParser, format_json_tool_call
from .streaming import InvalidToolCall, ParsedDelta, StreamingParser, ToolCallDelta

__all__ = [
    "Gemma4OutputParser",
    "InvalidToolCall",
    "JsonToolCallParser",
    "ParsedDelta",
    "StreamingParser",
    "ToolCallDelta",
    "format_json_tool_call",
    "parse_gemma4_value",
    "prompt_ends_in_thought",
    "to_gemma4_value",
]
