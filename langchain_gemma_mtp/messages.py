"""LangChain messages and tools to OpenAI-style dicts, and the normalization every request goes through.

Two steps, so the in-process path and the HTTP server treat a conversation the same way:

- `from_langchain` turns LangChain messages into OpenAI chat messages faithfully: content
  strings or lists of parts, AI tool calls with their arguments as dicts, tool messages with
  their `tool_call_id`. An AI message's reasoning (LangChain `reasoning` content blocks,
  `additional_kwargs["reasoning_content"]`, Anthropic `thinking` blocks) becomes
  `reasoning_content`, the field Gemma 4 templates replay thoughts from; Anthropic `tool_use`
  blocks become tool calls when `tool_calls` lacks them.
- `normalize_messages` makes OpenAI messages ready for a chat template: content becomes text
  (an image, audio or file part raises UnsupportedContentError, the model path is text-only),
  tool-call arguments given as JSON strings become dicts, an assistant message's reasoning
  (`reasoning_content`, `reasoning`, or reasoning parts of its content) is kept as
  `reasoning_content`, and consecutive messages of the same role merge into one (templates such
  as Gemma's demand alternating turns).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.utils.function_calling import convert_to_openai_tool

from .errors import InvalidRequestError, ToolSchemaError, UnsupportedContentError

# Content parts that carry no text for the prompt: thoughts of earlier turns, and tool calls that
# the message's `tool_calls` already carries.
_DROPPED_PARTS = frozenset({"thinking", "redacted_thinking", "reasoning", "tool_use", "tool_call", "tool_call_chunk"})
_MEDIA_PARTS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "video", "file", "input_file"})
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Separator of merged same-role messages: a blank line keeps them readable as separate paragraphs.
_MERGE_SEPARATOR = "\n\n"


def _openai_tool_call(call_id: str | None, name: str, args: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _ai_message(message: AIMessage) -> dict[str, Any]:
    calls = [_openai_tool_call(tc.get("id"), tc["name"], dict(tc.get("args") or {})) for tc in message.tool_calls]
    known = {tc.get("id") for tc in message.tool_calls}
    content = message.content
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "tool_use" and part.get("id") not in known:
                calls.append(_openai_tool_call(part.get("id"), part["name"], dict(part.get("input") or {})))
    result: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        result["tool_calls"] = calls
    reasoning = "".join(_block_reasoning(block) for block in message.content_blocks)
    if reasoning:
        result["reasoning_content"] = reasoning
    return result


def _block_reasoning(block: Mapping[str, Any]) -> str:
    """The thought text of a LangChain standard content block ("" for other blocks)."""
    if block.get("type") == "reasoning":
        return block.get("reasoning") or ""
    value = block.get("value") if block.get("type") == "non_standard" else None
    return _part_reasoning(value) if isinstance(value, Mapping) else ""


def _part_reasoning(part: Any) -> str:
    """The thought text of a content part in OpenAI-style content ("" for other parts)."""
    if not isinstance(part, Mapping):
        return ""
    kind = part.get("type")
    if kind == "thinking":
        return str(part.get("thinking") or "")
    if kind == "reasoning":
        return str(part.get("reasoning") or part.get("text") or "")
    return ""


def from_langchain(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """OpenAI-style chat messages for LangChain messages (content kept as given)."""
    result: list[dict[str, Any]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            result.append({"role": "system", "content": message.content})
        elif isinstance(message, HumanMessage):
            result.append({"role": "user", "content": message.content})
        elif isinstance(message, AIMessage):
            result.append(_ai_message(message))
        elif isinstance(message, ToolMessage):
            entry = {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
            if message.name:
                entry["name"] = message.name
            result.append(entry)
        elif isinstance(message, FunctionMessage):
            result.append({"role": "tool", "name": message.name, "content": message.content})
        elif isinstance(message, ChatMessage):
            role = {"human": "user", "ai": "assistant", "model": "assistant"}.get(message.role, message.role)
            result.append({"role": role, "content": message.content})
        else:
            raise InvalidRequestError(f"cannot send a {type(message).__name__} to the model: use System, Human, AI or Tool messages.")
    return result


def content_text(content: Any, where: str) -> str:
    """The text of a message content: a string, or a list of parts of which only text is kept.

    Raises UnsupportedContentError for media parts and for part types it does not know.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise InvalidRequestError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}.")
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str):  # a list or object here is not a part type (nor hashable)
            kind = repr(kind)[:100]
        if kind in ("text", "input_text", "output_text", "text-plain"):
            texts.append(str(part.get("text", "")))
        elif kind in _DROPPED_PARTS:
            continue
        elif kind in _MEDIA_PARTS:
            raise UnsupportedContentError(
                f"{where} has a {kind!r} content part, but this model path is text-only: images, audio, "
                "video and files cannot be read. Send text only (e.g. describe or transcribe the media)."
            )
        else:
            raise UnsupportedContentError(f"{where} has a content part of unsupported type {kind!r}; only text parts can be sent.")
    return "".join(texts)


def _arguments(call: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A tool call's arguments as a dict: chat templates iterate them, so a JSON string is decoded."""
    function = call.get("function", call)
    args = function.get("arguments")
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{where}: tool call arguments are not valid JSON ({exc}).") from exc
    if not isinstance(args, Mapping):
        raise InvalidRequestError(f"{where}: tool call arguments must be a JSON object, got {type(args).__name__}.")
    return dict(args)


def _call_name(call: Any, where: str) -> str:
    """A tool call's function name; InvalidRequestError for a call of the wrong shape."""
    function = call.get("function", call) if isinstance(call, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            f'{where}: each tool call must be an object {{"id", "type": "function", '
            f'"function": {{"name", "arguments"}}}}, got {call!r:.200}.'
        )
    return name


def _normalize_one(index: int, message: Mapping[str, Any]) -> dict[str, Any]:
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequestError(f"message {index} has role {role!r:.100}: use system, user, assistant or tool.")
    where = f"message {index} ({role})"
    entry: dict[str, Any] = {"role": role, "content": content_text(message.get("content"), where)}
    if role == "assistant":
        reasoning = _reasoning(message, where)
        if reasoning:
            entry["reasoning_content"] = reasoning
    if role == "assistant" and message.get("tool_calls"):
        calls = message["tool_calls"]
        if not isinstance(calls, list):
            raise InvalidRequestError(f"{where}: tool_calls must be a list of tool calls, got {type(calls).__name__}.")
        entry["tool_calls"] = []
        for call in calls:
            name = _call_name(call, where)
            entry["tool_calls"].append(_openai_tool_call(call.get("id"), name, _arguments(call, where)))
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if message.get(key):
                entry[key] = message[key]
    return entry


def _reasoning(message: Mapping[str, Any], where: str) -> str:
    """An assistant message's earlier thoughts: `reasoning_content` (vLLM, DeepSeek), `reasoning`,
    or the reasoning parts of its content."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{where}: {key} must be a string, got {type(value).__name__}.")
        if value:
            return value
    content = message.get("content")
    if isinstance(content, list):
        return "".join(_part_reasoning(part) for part in content)
    return ""


def merge_consecutive(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge runs of same-role messages (tool messages stay apart: each answers one call)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        previous = merged[-1] if merged else None
        if previous is None or previous["role"] != message["role"] or message["role"] == "tool":
            merged.append(dict(message))
            continue
        previous["content"] = _MERGE_SEPARATOR.join(t for t in (previous["content"], message["content"]) if t)
        if message.get("reasoning_content"):
            previous["reasoning_content"] = _MERGE_SEPARATOR.join(
                t for t in (previous.get("reasoning_content"), message["reasoning_content"]) if t
            )
        if message.get("tool_calls"):
            previous["tool_calls"] = previous.get("tool_calls", []) + message["tool_calls"]
    return merged


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Template-ready messages: text content, dict tool-call arguments, same-role runs merged."""
    if not messages:
        raise InvalidRequestError("messages is empty: send at least one message.")
    return merge_consecutive([_normalize_one(i, m) for i, m in enumerate(messages)])


def convert_tools(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-format tool definitions for LangChain tools, functions, pydantic/TypedDict classes or dicts.

    Raises ToolSchemaError at once for a schema that is not JSON-serializable, so a bad tool
    fails where it is bound, not mid-conversation.
    """
    result = []
    for tool in tools:
        try:
            spec = convert_to_openai_tool(tool)
        except (TypeError, ValueError) as exc:
            raise ToolSchemaError(f"cannot turn {tool!r} into a tool definition: {exc}") from exc
        result.append(check_tool(spec))
    return result


def check_tool(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check one OpenAI-format tool definition; return it as a plain dict."""
    function = spec.get("function") if isinstance(spec, Mapping) else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ToolSchemaError(f"tool definition {spec!r} has no function name.")
    try:
        # Round-trip through JSON: the prompt renders exactly what a JSON client would send.
        return json.loads(json.dumps(spec, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ToolSchemaError(f"tool {name!r} has a schema that is not JSON-serializable: {exc}") from exc


def tool_names(tools: Sequence[Mapping[str, Any]] | None) -> list[str]:
    return [t["function"]["name"] for t in tools or ()]


def normalize_tool_choice(tool_choice: Any, tools: Sequence[Mapping[str, Any]] | None) -> str | dict[str, Any] | None:
    """An OpenAI-style tool_choice for LangChain's forms; raises InvalidRequestError for an unknown tool.

    "auto"/None: the model decides; "none": no tool call; "any"/"required": some tool must be
    called; True: the only bound tool is called (several bound: some tool must be called); a tool
    name or {"type": "function", "function": {"name": ...}}: that tool is called.
    """
    names = tool_names(tools)
    if tool_choice is None or tool_choice == "auto":
        return tool_choice
    if tool_choice is False or tool_choice == "none":
        return "none"
    if not names:
        raise InvalidRequestError(f"tool_choice={tool_choice!r} but no tools are bound: pass tools too.")
    if tool_choice is True:
        return _named(names[0]) if len(names) == 1 else "required"
    if tool_choice in ("any", "required"):
        return "required"
    name: object
    if isinstance(tool_choice, str):
        name = tool_choice
    elif isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
    elif isinstance(tool_choice, Mapping) and tool_choice.get("type") in ("any", "required", "auto", "none"):
        return normalize_tool_choice(tool_choice["type"], tools)  # Anthropic's {"type": "any"} style
    elif isinstance(tool_choice, Mapping) and tool_choice.get("type") == "tool":
        name = tool_choice.get("name")  # Anthropic's {"type": "tool", "name": ...}
    else:
        raise InvalidRequestError(f"unsupported tool_choice {tool_choice!r}: use 'auto', 'none', 'any', 'required', True or a tool name.")
    if not isinstance(name, str) or name not in names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not a bound tool (bound: {', '.join(names)}).")
    return _named(name)


def _named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}
