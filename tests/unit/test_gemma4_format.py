"""Gemma 4 value syntax and the streaming output parser: round trips, split markers, invalid calls."""

from __future__ import annotations

import itertools
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parser_helpers import drain, split_at

from langchain_gemma_mtp.formats import (
    Gemma4OutputParser,
    InvalidToolCall,
    ParsedDelta,
    ToolCallDelta,
    parse_gemma4_value,
    prompt_ends_in_thought,
    to_gemma4_value,
)
from langchain_gemma_mtp.formats.gemma4 import forced_call_prefix, forced_opening

QUOTE = '<|"|>'
# Single special tokens in real output, so a model cannot write them inside a string.
CALL_MARKERS = (QUOTE, "<|tool_call>", "<tool_call|>")


def parse(pieces: list[str], tool_names: set[str] | None = None, thinking: bool = False) -> ParsedDelta:
    return drain(Gemma4OutputParser(tool_names, thinking=thinking), pieces)


def call_text(name: str, arguments: dict) -> str:
    return f"<|tool_call>call:{name}{to_gemma4_value(arguments)}<tool_call|>"


# JSON values whose strings stress the syntax: quotes, backslashes, braces, newlines, near-markers.
tricky_chars = st.sampled_from(list('<|">{}[]:,\\\n\t\'" ') + ["<|", "|>", '<|"', "call:", "é", "🙂", "\x00"])
json_text = st.lists(st.characters() | tricky_chars, max_size=12).map("".join).filter(lambda s: not any(m in s for m in CALL_MARKERS))
json_scalar = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text
)
json_value = st.recursive(
    json_scalar,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4),
    max_leaves=16,
)
json_args = st.dictionaries(json_text, json_value, max_size=5)


# -- value syntax ------------------------------------------------------------------------------


def test_to_gemma4_value_matches_the_format_doc() -> None:
    value = {"obj": {"k": "v"}, "key": "text", "n": 3, "flag": True, "xs": [1, 2], "none": None}
    assert to_gemma4_value(value) == ('{flag:true,key:<|"|>text<|"|>,n:3,none:null,obj:{k:<|"|>v<|"|>},xs:[1,2]}')


def test_to_gemma4_value_quotes_keys_that_are_not_identifiers() -> None:
    assert to_gemma4_value({"a b": 1, "1x": 2, "ok_1": 3}) == '{<|"|>1x<|"|>:2,<|"|>a b<|"|>:1,ok_1:3}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), {1: 2}, {"s": {1, 2}}])
def test_to_gemma4_value_rejects_what_json_cannot_hold(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        to_gemma4_value(bad)


def test_parse_gemma4_value_accepts_quoted_keys_json_strings_and_spaces() -> None:
    text = '{ <|"|>a key<|"|> : 1, "b": "x\\ny", c : [ true , null , -2.5e3 , ], }'
    assert parse_gemma4_value(text) == {"a key": 1, "b": "x\ny", "c": [True, None, -2500.0]}


def test_parse_gemma4_value_keeps_string_bodies_raw() -> None:
    assert parse_gemma4_value('{p:<|"|>C:\\new "dir"\n{x}<|"|>}') == {"p": 'C:\\new "dir"\n{x}'}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{city:<|"|>Paris}', "unterminated string"),
        ("{unit:celsius deg:2}", "unquoted value 'celsius deg:2' is ambiguous"),
        ('{say:hi "there"}', "is ambiguous"),
        ("{a:}", "expected a value"),
        ("{a:1", "unterminated object"),
        ("{a 1}", "expected ':'"),
        ("{a:1 b:2}", "is ambiguous"),
        ("{a:[1 2]}", "unquoted value '1 2' is ambiguous"),
        ("{a:[x,y z]}", "'y z' is ambiguous"),
        ("{a:x{}}", "expected ',' or '}'"),
        ("{a:1}x", "unexpected text after the value"),
        ("{a:1e999}", "out of range"),
        ("[" * 300 + "]" * 300, "nested more than"),
    ],
)
def test_parse_gemma4_value_errors_say_what_and_where(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)) as info:
        parse_gemma4_value(text)
    assert "position" in str(info.value) or "end of the text" in str(info.value)


@settings(max_examples=150, deadline=None)
@given(json_value)
def test_value_round_trip(value: object) -> None:
    assert parse_gemma4_value(to_gemma4_value(value)) == value


# -- streaming parser --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(json_args, st.lists(st.integers(min_value=0), max_size=6))
def test_tool_call_arguments_round_trip_through_the_streaming_parser(args: dict, cuts: list[int]) -> None:
    text = "Let me check." + call_text("lookup", args) + "Done."
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    result = parse(pieces, {"lookup"})
    assert result.content == "Let me check.Done."
    assert result.invalid_tool_calls == []
    [call] = result.tool_calls
    assert call.name == "lookup"
    assert json.loads(call.arguments) == args


def test_name_comes_first_then_the_arguments_with_a_call_id() -> None:
    parser = Gemma4OutputParser({"get_weather"})
    first = parser.feed('<|tool_call>call:get_weather{city:<|"|>Par')
    assert not first
    second = parser.feed('is<|"|>}<tool_call|>')
    head, args = second.tool_calls
    assert head.index == args.index == 0
    assert head.name == "get_weather" and head.arguments == ""
    assert re.fullmatch(r"call_[0-9a-f]+", head.id)
    assert args.id is None and args.name is None
    assert json.loads(args.arguments) == {"city": "Paris"}


def test_several_calls_get_their_own_index_and_id() -> None:
    parser = Gemma4OutputParser()
    delta = parser.feed(call_text("a", {"x": 1}) + call_text("b", {}) + "\n" + call_text("a", {"y": [2]}))
    heads = [c for c in delta.tool_calls if c.name]
    assert [(c.index, c.name) for c in heads] == [(0, "a"), (1, "b"), (2, "a")]
    assert len({c.id for c in heads}) == 3
    assert delta.content == "\n"


TRANSCRIPT = (
    "<|channel>thought\nThe user wants <weather> in |Paris|; call the tool.<channel|>"
    "Checking < the | weather >.\n"
    '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3,opts:{metric:true,tags:[<|"|>a<|"|>,null]}}<tool_call|>'
    "<|tool_call>call:get_time{}<tool_call|>"
    "<|tool_call>call:undeclared{a:1}<tool_call|>"
    "<|tool_call>call:get_time{broken<tool_call|>"
    "Partial-looking text: <|tool <|chan <tool_call <channel <| |> end"
    "<|channel>thought<channel|>"
    "<|tool_call>call:get_weather{city:"
)


def expected_transcript() -> ParsedDelta:
    return ParsedDelta(
        content="Checking < the | weather >.\nPartial-looking text: <|tool <|chan <tool_call <channel <| |> end",
        reasoning="The user wants <weather> in |Paris|; call the tool.",
        tool_calls=[
            ToolCallDelta(0, None, "get_weather", '{"city": "Paris", "days": 3, "opts": {"metric": true, "tags": ["a", null]}}'),
            ToolCallDelta(1, None, "get_time", "{}"),
        ],
        invalid_tool_calls=[
            InvalidToolCall(
                2,
                "",
                "undeclared",
                "<|tool_call>call:undeclared{a:1}<tool_call|>",
                "tool 'undeclared' was not declared (declared: get_time, get_weather)",
            ),
            InvalidToolCall(
                3,
                "",
                "get_time",
                "<|tool_call>call:get_time{broken<tool_call|>",
                "arguments do not parse: expected ':' after key 'broken' at the end of the text",
            ),
            InvalidToolCall(4, "", "get_weather", "<|tool_call>call:get_weather{city:", "tool call not closed with <tool_call|>"),
        ],
    )


TOOLS = {"get_weather", "get_time"}


def test_transcript_fed_at_once() -> None:
    assert parse([TRANSCRIPT], TOOLS) == expected_transcript()


def test_every_split_into_two_feeds_parses_the_same() -> None:
    expected = expected_transcript()
    for cut in range(len(TRANSCRIPT) + 1):
        assert parse([TRANSCRIPT[:cut], TRANSCRIPT[cut:]], TOOLS) == expected, f"split at {cut}"


def test_one_character_at_a_time_parses_the_same() -> None:
    assert parse(list(TRANSCRIPT), TOOLS) == expected_transcript()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(TRANSCRIPT)), max_size=20))
def test_any_chunking_parses_the_same(cuts: list[int]) -> None:
    bounds = sorted({0, len(TRANSCRIPT), *cuts})
    assert parse([TRANSCRIPT[a:b] for a, b in itertools.pairwise(bounds)], TOOLS) == expected_transcript()


def test_content_never_shows_a_partial_marker_while_streaming() -> None:
    parser = Gemma4OutputParser()
    assert parser.feed("Hello <|tool_").content == "Hello "
    assert parser.feed("cal").content == ""
    assert parser.feed("m").content == "<|tool_calm"  # not a marker after all: released at once


def test_held_back_text_is_flushed_by_finish() -> None:
    parser = Gemma4OutputParser()
    assert parser.feed("the end <|chan").content == "the end "
    assert parser.finish().content == "<|chan"


def test_thought_streams_as_reasoning_and_an_empty_channel_yields_nothing() -> None:
    parser = Gemma4OutputParser(thinking=True)
    assert parser.feed("<|channel>thou").reasoning == ""
    assert parser.feed("ght\nstep one, ").reasoning == "step one, "
    assert parser.feed("step two<chan").reasoning == "step two"
    delta = parser.feed("nel|>Answer.")
    assert (delta.reasoning, delta.content) == ("", "Answer.")
    assert parse(["<|channel>thought\n<channel|>Hi"]) == ParsedDelta(content="Hi")


def test_a_thought_keeps_back_its_last_newline_until_it_knows_whether_the_channel_closes() -> None:
    parser = Gemma4OutputParser(thinking=True)
    assert parser.feed("<|channel>thought\nstep one\n").reasoning == "step one"
    assert parser.feed("\n").reasoning == "\n"  # of two newlines only the last can be framing
    assert parser.feed("step two\n").reasoning == "\nstep two"
    delta = parser.feed("<channel|>Answer.")
    assert (delta.reasoning, delta.content) == ("", "Answer.")


# Text a model may write inside a thought: anything but the markers that end or restart it.
thought_text = (
    st.lists(st.characters() | st.sampled_from(["\n", "<", "|>", "<|", "thought", "<channel|"]), max_size=20)
    .map("".join)
    .filter(lambda s: "<channel|>" not in s and "<|channel>" not in s)
)


@settings(max_examples=150, deadline=None)
@given(thought_text, st.booleans(), st.lists(st.integers(min_value=0), max_size=6))
def test_replaying_the_reasoning_as_the_templates_do_gives_back_what_the_model_wrote(
    thought: str, in_thought: bool, cuts: list[int]
) -> None:
    # The official templates replay an earlier thought as '<|channel>thought\n' + reasoning + '\n<channel|>'.
    written = "<|channel>thought\n" + thought + "\n<channel|>"
    output = (written[len("<|channel>thought\n") :] if in_thought else written) + "Answer."
    result = drain(Gemma4OutputParser(in_thought=in_thought), split_at(output, cuts))
    assert "<|channel>thought\n" + result.reasoning + "\n<channel|>" == written
    assert result.content == "Answer."


def test_a_channel_without_a_name_line_keeps_all_its_text() -> None:
    assert parse(["<|channel>no header here<channel|>x"]).reasoning == "no header here"


def test_an_unclosed_thought_is_still_reasoning() -> None:
    result = parse(["<|channel>thought\nrunning out of tok"], thinking=True)
    assert result == ParsedDelta(reasoning="running out of tok")


@pytest.mark.parametrize(
    ("body", "name", "reason"),
    [
        ('call:get_weather{city:<|"|>Paris}', "get_weather", "unterminated string"),
        ("call:get_weather{city:Paris days:3}", "get_weather", "'Paris days:3' is ambiguous"),
        ("call:get_weather", None, "expected call:NAME{...}"),
        ('get_weather{city:<|"|>Paris<|"|>}', None, "expected call:NAME{...}"),
        ("call:get_weather{} trailing", "get_weather", "unexpected text after the value"),
        ('call:rm_rf{path:<|"|>/<|"|>}', "rm_rf", "tool 'rm_rf' was not declared"),
    ],
)
def test_bad_calls_become_invalid_and_keep_the_content_around_them(body: str, name: str | None, reason: str) -> None:
    raw = f"<|tool_call>{body}<tool_call|>"
    result = parse([f"Before. {raw} After."], {"get_weather"})
    assert result.content == "Before.  After."
    assert result.tool_calls == []
    [invalid] = result.invalid_tool_calls
    assert (invalid.index, invalid.name, invalid.raw) == (0, name, raw)
    assert reason in invalid.error


def test_invalid_call_ids_look_like_call_ids() -> None:
    parser = Gemma4OutputParser({"a"})
    [invalid] = parser.feed("<|tool_call>call:b{}<tool_call|>").invalid_tool_calls
    assert re.fullmatch(r"call_[0-9a-f]+", invalid.id)


def test_without_tool_names_any_tool_may_be_called() -> None:
    [call] = parse([call_text("anything", {"a": 1})]).tool_calls
    assert json.loads(call.arguments) == {"a": 1}


def test_unclosed_call_at_finish_is_invalid_with_all_its_text() -> None:
    text = 'ok <|tool_call>call:get_weather{city:<|"|>Par'
    result = parse([text], {"get_weather"})
    assert result.content == "ok "
    [invalid] = result.invalid_tool_calls
    assert invalid.raw == text[3:]
    assert invalid.name == "get_weather"
    assert "not closed" in invalid.error


def test_a_call_restarted_before_closing_is_invalid_and_the_next_one_parses() -> None:
    first = '<|tool_call>call:get_weather{city:<|"|>Par'
    result = parse([first + call_text("get_weather", {"city": "Paris"})], {"get_weather"})
    [invalid] = result.invalid_tool_calls
    assert (invalid.index, invalid.raw) == (0, first)
    [call] = result.tool_calls
    assert call.index == 1 and json.loads(call.arguments) == {"city": "Paris"}


def test_text_inside_a_thought_is_not_parsed_as_a_call() -> None:
    result = parse(["<|channel>thought\nmaybe <|tool_call>call:x{}<tool_call|>?<channel|>no"])
    assert result == ParsedDelta(content="no", reasoning="maybe <|tool_call>call:x{}<tool_call|>?")


# -- start state and forced openings ----------------------------------------------------------

# Rendered by the July 2026 revision of the 31B template (ollama's copy,
# model/renderers/testdata/gemma4_31b_chat_template.jinja2 at 8a0016f82): one get_weather tool,
# "Weather in Paris?", and for the tool loop an assistant call (with its reasoning) and its result.
_SYSTEM = (
    '<|tool>declaration:get_weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{type:<|"|>STRING<|"|>}},'
    'required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n'
)
_LOOP = (
    '<|channel>thought\nI should call the tool.\n<channel|><|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>'
    '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
)
JULY_PROMPTS = {
    "user, thinking on": ("<bos><|turn>system\n<|think|>\n" + _SYSTEM, False),
    "user, thinking off": ("<bos><|turn>system\n" + _SYSTEM + "<|channel>thought\n<channel|>", False),
    "tool loop, thinking on": ("<bos><|turn>system\n<|think|>\n" + _SYSTEM + _LOOP + "<|channel>thought\n", True),
    "tool loop, thinking off": ("<bos><|turn>system\n" + _SYSTEM + _LOOP, False),
}


@pytest.mark.parametrize("name", JULY_PROMPTS)
def test_prompt_ends_in_thought_reads_the_rendered_prompt(name: str) -> None:
    prompt, in_thought = JULY_PROMPTS[name]
    assert prompt_ends_in_thought(prompt) is in_thought


@pytest.mark.parametrize(
    ("prompt", "in_thought"),
    [
        ("<|turn>model\n<|channel>thought\nI'm", True),  # llama.cpp's continuation of a prefilled thought
        ("<|turn>model\n<|channel>", True),
        ("no turns at all <|channel>thought\n", False),
        ("<|turn>user\n<|channel>thought\n<turn|>\n<|turn>model\n", False),  # a channel in an earlier turn
        # Text inside a tool result that spells a channel opening is not the template's: the
        # template's own marker after it shows the prompt is not inside a channel.
        ('<|turn>model\n<|tool_response>response:f{value:<|"|>x<|channel>thought\n<|"|>}<tool_response|>', False),
    ],
)
def test_prompt_ends_in_thought_only_inside_an_open_channel_of_the_last_model_turn(prompt: str, in_thought: bool) -> None:
    assert prompt_ends_in_thought(prompt) is in_thought


def test_a_parser_started_in_thought_reads_thought_until_the_channel_closes() -> None:
    prompt, _ = JULY_PROMPTS["tool loop, thinking on"]
    parser = Gemma4OutputParser({"get_weather"}, thinking=True, in_thought=prompt_ends_in_thought(prompt))
    first = parser.feed("It is sunny.\n<chan")
    assert (first.reasoning, first.content) == ("It is sunny.", "")
    rest = parser.feed("nel|>Sunny in Paris.")
    assert (rest.reasoning, rest.content) == ("", "Sunny in Paris.")


@pytest.mark.parametrize(
    ("forced", "model_writes"),
    [
        (forced_call_prefix("get_weather"), 'city:<|"|>Paris<|"|>}<tool_call|>'),
        (forced_call_prefix(None), 'get_weather{city:<|"|>Paris<|"|>}<tool_call|>'),
        ("{", '"city": "Paris"}'),
    ],
)
def test_a_forced_opening_after_an_open_thought_closes_it_first(forced: str, model_writes: str) -> None:
    assert forced_opening(forced, in_thought=False) == forced
    assert forced_opening("", in_thought=True) == ""
    opening = forced_opening(forced, in_thought=True)
    assert opening == "<channel|>" + forced
    result = drain(Gemma4OutputParser({"get_weather"}, in_thought=True), [opening, model_writes])
    assert result.reasoning == "" and result.invalid_tool_calls == []
    if forced == "{":
        assert json.loads(result.content) == {"city": "Paris"}
    else:
        [parsed] = result.tool_calls
        assert (parsed.name, json.loads(parsed.arguments)) == ("get_weather", {"city": "Paris"})
