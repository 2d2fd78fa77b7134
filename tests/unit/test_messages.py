"""LangChain messages and tools to OpenAI-style dicts: merging, list content, tool history, bad input."""

from __future__ import annotations

import math

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.errors import InvalidRequestError, ToolSchemaError, UnsupportedContentError
from langchain_gemma_mtp.messages import convert_tools, from_langchain, normalize_messages, normalize_tool_choice


def convert(messages) -> list[dict]:
    return normalize_messages(from_langchain(messages))


@tool
def get_weather(city: str) -> str:
    """Weather in a city."""
    return "sunny"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


TOOLS = convert_tools([get_weather, add])


def test_roles_and_tool_history() -> None:
    messages = [
        SystemMessage("Be brief."),
        HumanMessage("Weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("sunny", tool_call_id="c1", name="get_weather"),
        ToolMessage("also sunny", tool_call_id="c2"),
        ChatMessage(role="model", content="It is sunny."),
    ]
    assert convert(messages) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_call_id": "c1", "name": "get_weather"},
        {"role": "tool", "content": "also sunny", "tool_call_id": "c2"},  # tool messages never merge
        {"role": "assistant", "content": "It is sunny."},
    ]


def test_consecutive_same_role_messages_merge() -> None:
    messages = [
        SystemMessage("hello"),
        SystemMessage("hello"),
        HumanMessage("hello"),
        HumanMessage("hello"),
        AIMessage("hello"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "x", "type": "tool_call"}]),
        HumanMessage("how are you"),
    ]
    merged = convert(messages)
    assert [m["role"] for m in merged] == ["system", "user", "assistant", "user"]
    assert merged[0]["content"] == merged[1]["content"] == "hello\n\nhello"
    assert merged[2]["content"] == "hello"  # an empty content adds no separator
    assert merged[2]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1, "b": 2}}


def test_anthropic_style_list_content() -> None:
    messages = [
        HumanMessage([{"type": "text", "text": "what's your ", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "color"}]),
        AIMessage(
            [
                {"type": "thinking", "thinking": "Let me think.", "signature": "abc"},
                {"type": "text", "text": "Hmm let me think about that"},
                {"type": "tool_use", "input": {"fav_color": "purple"}, "id": "foo", "name": "color_picker"},
            ]
        ),
        ToolMessage([{"type": "text", "text": "That's a great pick!"}], tool_call_id="foo"),
    ]
    user, ai, result = convert(messages)
    assert user == {"role": "user", "content": "what's your color"}
    # Thoughts go to reasoning_content (the templates decide what to replay); tool_use blocks
    # become tool calls with dict arguments.
    assert ai["content"] == "Hmm let me think about that"
    assert ai["reasoning_content"] == "Let me think."
    assert ai["tool_calls"] == [
        {"id": "foo", "type": "function", "function": {"name": "color_picker", "arguments": {"fav_color": "purple"}}}
    ]
    assert result["content"] == "That's a great pick!"


@pytest.mark.parametrize(
    "ai",
    [
        AIMessage("", additional_kwargs={"reasoning_content": "Weather first."}, tool_calls=[{"name": "add", "args": {}, "id": "c1"}]),
        AIMessage([{"type": "reasoning", "reasoning": "Weather first."}], tool_calls=[{"name": "add", "args": {}, "id": "c1"}]),
        AIMessage(
            [{"type": "reasoning", "reasoning": "Weather "}, {"type": "reasoning", "reasoning": "first."}],
            tool_calls=[{"name": "add", "args": {}, "id": "c1"}],
        ),
    ],
    ids=["additional_kwargs", "content_block", "two_blocks"],
)
def test_ai_reasoning_is_carried_to_reasoning_content(ai) -> None:
    [converted] = convert([ai])
    assert converted["reasoning_content"] == "Weather first."
    assert converted["content"] == ""


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_wire_assistant_reasoning_is_kept_under_reasoning_content(key) -> None:
    [converted] = normalize_messages([{"role": "assistant", "content": "Hi", key: "Greet."}])
    assert converted == {"role": "assistant", "content": "Hi", "reasoning_content": "Greet."}
    [from_parts] = normalize_messages(
        [{"role": "assistant", "content": [{"type": "thinking", "thinking": "Greet."}, {"type": "text", "text": "Hi"}]}]
    )
    assert from_parts == converted


def test_reasoning_of_merged_assistant_messages_is_joined_and_bad_types_refused() -> None:
    merged = normalize_messages(
        [
            {"role": "assistant", "content": "a", "reasoning_content": "one"},
            {"role": "assistant", "content": "b", "reasoning_content": "two"},
        ]
    )
    assert merged == [{"role": "assistant", "content": "a\n\nb", "reasoning_content": "one\n\ntwo"}]
    with pytest.raises(InvalidRequestError, match="reasoning_content must be a string"):
        normalize_messages([{"role": "assistant", "content": "a", "reasoning_content": ["x"]}])


def test_tool_use_blocks_already_in_tool_calls_are_not_doubled() -> None:
    call = {"name": "add", "args": {"a": 1, "b": 2}, "id": "abc123", "type": "tool_call"}
    ai = AIMessage(
        [{"type": "text", "text": "some text"}, {"type": "tool_use", "id": "abc123", "name": "add", "input": {"a": 1, "b": 2}}],
        tool_calls=[call],
    )
    [converted] = convert([ai])
    assert len(converted["tool_calls"]) == 1 and converted["content"] == "some text"


def test_openai_json_string_arguments_become_dicts() -> None:
    messages = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}],
        }
    ]
    assert normalize_messages(messages)[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    messages[0]["tool_calls"][0]["function"]["arguments"] = "{not json"
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        normalize_messages(messages)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image", "base64": "AAAA", "mime_type": "image/png"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
        {"type": "audio", "base64": "AAAA", "mime_type": "audio/wav"},
        {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
        {"type": "file", "base64": "AAAA", "mime_type": "application/pdf"},
    ],
)
def test_media_parts_raise_a_clear_text_only_error(part) -> None:
    with pytest.raises(UnsupportedContentError, match=rf"message 0 \(user\) has a '{part['type']}' content part.*text-only"):
        convert([HumanMessage([{"type": "text", "text": "Describe this:"}, part])])


def test_media_in_a_tool_result_also_raises() -> None:
    with pytest.raises(UnsupportedContentError, match="text-only"):
        convert([ToolMessage([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], tool_call_id="1")])


def test_unknown_part_types_raise() -> None:
    with pytest.raises(UnsupportedContentError, match="unsupported type 'hologram'"):
        convert([HumanMessage([{"type": "hologram"}])])


def test_empty_message_list_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="messages is empty"):
        normalize_messages([])


def test_unknown_role_raises() -> None:
    with pytest.raises(InvalidRequestError, match="role 'narrator'"):
        normalize_messages([{"role": "narrator", "content": "Once"}])


# -- tools --------------------------------------------------------------------------------------


def test_tools_become_openai_format() -> None:
    assert TOOLS[0] == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city.",
            "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"},
        },
    }
    anthropic = {"name": "color_picker", "description": "Pick.", "input_schema": {"type": "object", "properties": {}}}
    assert convert_tools([anthropic])[0]["function"]["name"] == "color_picker"


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "default": object()}}},
        {"type": "function", "function": {"name": "f", "parameters": {"type": "number", "maximum": math.inf}}},
    ],
)
def test_a_tool_schema_that_is_not_json_serializable_fails_at_bind_time(bad) -> None:
    with pytest.raises(ToolSchemaError, match="tool 'f' has a schema that is not JSON-serializable"):
        convert_tools([bad])
    with pytest.raises(ValueError, match="not JSON-serializable"):
        ChatGemmaMTP().bind_tools([bad])  # at bind time: nothing is loaded or invoked


@pytest.mark.parametrize(
    "choice,expected",
    [
        (None, None),
        ("auto", "auto"),
        ("none", "none"),
        (False, "none"),
        ("any", "required"),
        ("required", "required"),
        (True, "required"),  # several tools bound: some tool must be called
        ("add", {"type": "function", "function": {"name": "add"}}),
        ({"type": "function", "function": {"name": "add"}}, {"type": "function", "function": {"name": "add"}}),
        ({"type": "tool", "name": "add"}, {"type": "function", "function": {"name": "add"}}),
        ({"type": "any"}, "required"),
    ],
)
def test_tool_choice_forms(choice, expected) -> None:
    assert normalize_tool_choice(choice, TOOLS) == expected


def test_true_with_one_tool_forces_that_tool() -> None:
    assert normalize_tool_choice(True, TOOLS[:1]) == {"type": "function", "function": {"name": "get_weather"}}


def test_unknown_tool_choice_raises_at_bind_time() -> None:
    with pytest.raises(ValueError, match="tool_choice names 'launch', which is not a bound tool \\(bound: get_weather, add\\)"):
        ChatGemmaMTP().bind_tools([get_weather, add], tool_choice="launch")
    with pytest.raises(ValueError, match="no tools are bound"):
        normalize_tool_choice("any", [])


def test_bind_tools_stores_openai_tools_and_options() -> None:
    bound = ChatGemmaMTP().bind_tools([get_weather, add], tool_choice="any", parallel_tool_calls=False, draft_hint="tool_call")
    assert bound.kwargs == {
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "draft_hint": "tool_call",
    }
    with pytest.raises(ValueError, match="draft_hint"):
        ChatGemmaMTP().bind_tools([add], draft_hint="poetry")
