"""The JSON tool-call convention parser: round trips, split markers, repairs, invalid calls."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parser_helpers import drain

from langchain_gemma_mtp.formats import (
    InvalidToolCall,
    JsonToolCallParser,
    ParsedDelta,
    ToolCallDelta,
    format_json_tool_call,
)


def parse(pieces: list[str], tool_names: set[str] | None = None) -> ParsedDelta:
    return drain(JsonToolCallParser(tool_names), pieces)


json_text = st.text().filter(lambda s: "</tool_call>" not in s and "<tool_call>" not in s)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | json_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4),
    max_leaves=16,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(json_text, json_value, max_size=5), st.lists(st.integers(min_value=0), max_size=6))
def test_arguments_round_trip_in_any_chunking(args: dict, cuts: list[int]) -> None:
    text = "Calling it.\n" + format_json_tool_call("search", args) + "\nDone."
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    result = parse([text[a:b] for a, b in itertools.pairwise(bounds)], {"search"})
    assert result.content == "Calling it.\n\nDone."
    [call] = result.tool_calls
    assert call.name == "search" and json.loads(call.arguments) == args


TRANSCRIPT = (
    "Looking <it> up </tool> <tool_ now.\n"
    '<tool_call>{"name": "search", "arguments": {"q": "a \\"b\\" </c>", "n": [1, 2.5, null]}}</tool_call>\n'
    '<tool_call>{"name": "search", "arguments": {\'q\': \'it\\\'s\', "exact": True, "n": [1,],}</tool_call>\n'
    '<tool_call>{"name": "drop_tables", "arguments": {}}</tool_call>\n'
    "<tool_call>not json at all</tool_call>\n"
    "bye <tool_call"
    '<tool_call>{"name": "search", "arguments": {"q": "trunc'
)

EXPECTED = ParsedDelta(
    content="Looking <it> up </tool> <tool_ now.\n\n\n\n\nbye <tool_call",
    tool_calls=[
        ToolCallDelta(0, None, "search", '{"q": "a \\"b\\" </c>", "n": [1, 2.5, null]}'),
        ToolCallDelta(1, None, "search", '{"q": "it\'s", "exact": true, "n": [1]}'),
    ],
    invalid_tool_calls=[
        InvalidToolCall(
            2,
            "",
            "drop_tables",
            '<tool_call>{"name": "drop_tables", "arguments": {}}</tool_call>',
            "tool 'drop_tables' was not declared (declared: search)",
        ),
        InvalidToolCall(
            3,
            "",
            None,
            "<tool_call>not json at all</tool_call>",
            "tool call is not JSON: unquoted word 'not' is not a value (strings must be quoted) at position 0 ('not json at all')",
        ),
        InvalidToolCall(
            4, "", "search", '<tool_call>{"name": "search", "arguments": {"q": "trunc', "tool call not closed with </tool_call>"
        ),
    ],
)


def test_transcript_fed_at_once() -> None:
    assert parse([TRANSCRIPT], {"search"}) == EXPECTED


def test_every_split_into_two_feeds_parses_the_same() -> None:
    for cut in range(len(TRANSCRIPT) + 1):
        assert parse([TRANSCRIPT[:cut], TRANSCRIPT[cut:]], {"search"}) == EXPECTED, f"split at {cut}"


def test_one_character_at_a_time_parses_the_same() -> None:
    assert parse(list(TRANSCRIPT), {"search"}) == EXPECTED


def test_name_first_then_arguments_with_a_call_id() -> None:
    parser = JsonToolCallParser()
    assert not parser.feed('<tool_call>{"name": "f", "argu')
    head, args = parser.feed('ments": {"x": 1}}</tool_call>').tool_calls
    assert (head.index, head.name, head.arguments) == (0, "f", "")
    assert re.fullmatch(r"call_[0-9a-f]+", head.id)
    assert (args.index, args.id, args.name, json.loads(args.arguments)) == (0, None, None, {"x": 1})


@pytest.mark.parametrize(
    ("body", "arguments"),
    [
        ('{"name": "f", "arguments": {"a": 1}', {"a": 1}),  # closing brace missing
        ('{"name": "f", "arguments": {"a": ["x", "y\\', {"a": ["x", "y"]}),  # cut inside a string, after a backslash
        ('{"name": "f", "arguments": {"text": "line one\nline two"}}', {"text": "line one\nline two"}),
        ("{'name': 'f', 'arguments': {'a': None, 'b': False}}", {"a": None, "b": False}),
        ('{"name": "f", "arguments": {"a": [1, 2,],},}', {"a": [1, 2]}),
        ('{name: "f", arguments: {a: "x"}}', {"a": "x"}),
        ('{"name": "f", "parameters": {"a": 1}}', {"a": 1}),
        ('{"name": "f", "arguments": "{\\"a\\": 1}"}', {"a": 1}),
        ('{"name": "f"}', {}),
    ],
)
def test_slightly_broken_json_is_repaired(body: str, arguments: dict) -> None:
    [call] = parse([f"<tool_call>{body}</tool_call>"]).tool_calls
    assert call.name == "f" and json.loads(call.arguments) == arguments


@pytest.mark.parametrize(
    ("body", "name", "reason"),
    [
        ('["f", {"a": 1}]', None, "must be a JSON object"),
        ('{"arguments": {}}', None, 'no "name" string'),
        ('{"name": "f", "arguments": [1]}', "f", "arguments must be an object"),
        ('{"name": "f", "arguments": "{oops"}', "f", "arguments string is not JSON"),
        ('{"name": "f", "arguments": {"a": 1}}}', None, "unexpected text after the value"),
    ],
)
def test_unusable_calls_become_invalid_and_keep_the_content(body: str, name: str | None, reason: str) -> None:
    raw = f"<tool_call>{body}</tool_call>"
    result = parse([f"before {raw} after"])
    assert result.content == "before  after"
    assert result.tool_calls == []
    [invalid] = result.invalid_tool_calls
    assert (invalid.name, invalid.raw) == (name, raw)
    assert reason in invalid.error


def test_held_back_text_is_flushed_by_finish() -> None:
    parser = JsonToolCallParser()
    assert parser.feed("a <tool_ca").content == "a "
    assert parser.finish().content == "<tool_ca"
