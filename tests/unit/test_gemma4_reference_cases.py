"""Gemma 4 outputs from the reference parsers' own test cases, read by ours, whole and in any pieces.

Each case's input comes from a test of vLLM, llama.cpp or ollama (named above the group) and
expects what that test expects, except where a `note` says how and why ours differs. The
property tests at the end split every case (and ours) at every position and into random pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parser_helpers import drain, split_at, summary

from langchain_gemma_mtp.formats import Gemma4OutputParser

Q = '<|"|>'


@dataclass(frozen=True)
class Case:
    text: str
    content: str = ""
    reasoning: str = ""
    calls: tuple[tuple[str, object], ...] = ()  # (name, arguments) in order
    invalid: tuple[tuple[str | None, str], ...] = ()  # (name, a piece of the reason) in order
    in_thought: bool = False
    note: str = ""  # how and why ours differs from the reference's expectation


def call(args: str, name: str = "f") -> str:
    return f"<|tool_call>call:{name}{{{args}}}<tool_call|>"


def args_case(args: str, expected: object, note: str = "") -> Case:
    return Case(call(args), calls=(("f", expected),), note=note)


def strict_case(args: str, reason: str, note: str) -> Case:
    return Case(call(args), invalid=(("f", reason),), note=note)


# vllm-project/vllm tests/tool_parsers/test_gemma4_tool_parser.py (TestParseGemma4Args, TestParseGemma4Array,
# TestExtractToolCalls, TestStreamingExtraction).
VLLM_TOOLS = {
    "empty": args_case("", {}),
    "whitespace_only": args_case("   ", {}),
    "single_string": args_case(f"location:{Q}Paris{Q}", {"location": "Paris"}),
    "string_with_comma": args_case(f"location:{Q}Paris, France{Q}", {"location": "Paris, France"}),
    "multiple_strings": args_case(f"location:{Q}San Francisco{Q},unit:{Q}celsius{Q}", {"location": "San Francisco", "unit": "celsius"}),
    "integer": args_case("count:42", {"count": 42}),
    "float": args_case("score:3.14", {"score": 3.14}),
    "exponent": args_case("score:1e3", {"score": 1000.0}),
    "trailing_dot_float": args_case("score:108.", {"score": 108.0}),
    "true": args_case("flag:true", {"flag": True}),
    "false": args_case("flag:false", {"flag": False}),
    "null": args_case("param:null", {"param": None}),
    "mixed": args_case(f"name:{Q}test{Q},count:42,active:true,score:3.14", {"name": "test", "count": 42, "active": True, "score": 3.14}),
    "nested_object": args_case(f"nested:{{inner:{Q}value{Q}}}", {"nested": {"inner": "value"}}),
    "array_of_strings": args_case(f"items:[{Q}a{Q},{Q}b{Q}]", {"items": ["a", "b"]}),
    "array_empty": args_case("items:[]", {"items": []}),
    "array_bare_values": args_case("items:[42,true,3.14]", {"items": [42, True, 3.14]}),
    "array_string_with_closing_bracket": args_case(f"items:[[{Q}a]b{Q},{Q}c{Q}],{Q}tail{Q}]", {"items": [["a]b", "c"], "tail"]}),
    "unterminated_string": strict_case(
        f"key:{Q}unterminated", "unterminated string", "vLLM takes the rest as the value; cut off, it may mean more"
    ),
    "empty_value": strict_case("key:", "expected a value", 'vLLM reads {"key": ""}; nothing was written'),
    "malformed_partial_array": strict_case(":[t:[]", "expected a key", "vLLM returns some dict"),
    "stray_closing_bracket": strict_case("items:[42,]trailing]", "expected ',' or '}'", "vLLM reads [42] and drops the rest"),
    "single_call": Case(
        f"<|tool_call>call:get_weather{{location:{Q}London{Q}}}<tool_call|>", calls=(("get_weather", {"location": "London"}),)
    ),
    "text_before_call": Case(
        f"Let me check the weather for you. <|tool_call>call:get_weather{{location:{Q}Paris{Q}}}<tool_call|>",
        content="Let me check the weather for you. ",
        calls=(("get_weather", {"location": "Paris"}),),
        note="vLLM strips the content's trailing space; we pass text on as written",
    ),
    "two_calls": Case(
        call(f"location:{Q}London{Q}", "get_weather") + call(f"location:{Q}London{Q}", "get_time"),
        calls=(("get_weather", {"location": "London"}), ("get_time", {"location": "London"})),
    ),
    "nested_arguments": Case(
        call(f"nested:{{inner:{Q}value{Q}}},list:[{Q}a{Q},{Q}b{Q}]", "complex_function"),
        calls=(("complex_function", {"nested": {"inner": "value"}, "list": ["a", "b"]}),),
    ),
    "incomplete_call": Case(
        f"<|tool_call>call:get_weather{{location:{Q}London",
        invalid=(("get_weather", "not closed"),),
        note="vLLM returns the text as content; a cut-off call is an invalid call here, never content",
    ),
    "hyphenated_name": Case(call(f"location:{Q}London{Q}", "get-weather"), calls=(("get-weather", {"location": "London"}),)),
    "dotted_name": Case(call(f"location:{Q}London{Q}", "weather.get"), calls=(("weather.get", {"location": "London"}),)),
    "no_arguments": Case(call("", "get_status"), calls=(("get_status", {}),)),
    "split_delimiter": args_case(f"content:{Q}Buy milk{Q}", {"content": "Buy milk"}),
    "plain_text_after_call": Case(
        call(f"location:{Q}Paris{Q}", "get_weather") + "<div>",
        content="<div>",
        calls=(("get_weather", {"location": "Paris"}),),
    ),
    "html_argument": args_case(
        f'path:{Q}index.html{Q},content:{Q}<!DOCTYPE html>\n<html lang="zh-CN">\n<head>\n    <meta charset="UTF-8">\n{Q}',
        {"path": "index.html", "content": '<!DOCTYPE html>\n<html lang="zh-CN">\n<head>\n    <meta charset="UTF-8">\n'},
    ),
    "trailing_bare_bool": args_case(
        f"file_path:{Q}src/env.py{Q},old_string:{Q}old_val{Q},new_string:{Q}new_val{Q},replace_all:false",
        {"file_path": "src/env.py", "old_string": "old_val", "new_string": "new_val", "replace_all": False},
    ),
    "boolean_in_nested_object": args_case("input:{all:true}", {"input": {"all": True}}),
    "two_calls_in_one_delta": Case(
        call("alpha:15,beta:1,gamma:1990", "first_tool") + call("delta:9,epsilon:30", "second_tool"),
        calls=(("first_tool", {"alpha": 15, "beta": 1, "gamma": 1990}), ("second_tool", {"delta": 9, "epsilon": 30})),
    ),
    "incomplete_call_emits_no_partial_args": Case("<|tool_call>call:first_tool{alpha:15,beta:1", invalid=(("first_tool", "not closed"),)),
    "split_floats": args_case("latitude:108.2,longitude:22.8", {"latitude": 108.2, "longitude": 22.8}),
    "filename_suffix": args_case(f"path:{Q}src/main.rs{Q}", {"path": "src/main.rs"}),
    "string_prefix": args_case(f"mode:{Q}edit{Q}", {"mode": "edit"}),
    # vllm tool_parsers/gemma4_tool_parser.py reads an unquoted value that is not a number or a
    # literal as a string (`_parse_gemma4_value`), keys as any text up to the colon.
    "bare_string_value": args_case("unit:celsius", {"unit": "celsius"}),
    "bare_expression": args_case("expression:432+1", {"expression": "432+1"}),
}

# vllm-project/vllm tests/reasoning/test_gemma4_reasoning_parser.py: vLLM's reasoning parser,
# whose answer differs between its streaming and whole-text paths for text before a `<channel|>`
# with no `<|channel>`; ours decides from the prompt (in_thought) instead.
VLLM_REASONING = {
    "invalid_simple_streaming": Case(
        "This is a reasoning section<channel|>This is the rest", content="This is a reasoning sectionThis is the rest"
    ),
    "invalid_simple_in_thought": Case(
        "This is a reasoning section<channel|>This is the rest",
        reasoning="This is a reasoning section",
        content="This is the rest",
        in_thought=True,
    ),
    "invalid_complete_streaming": Case("This is a reasoning section<channel|>", content="This is a reasoning section"),
    "invalid_complete_in_thought": Case("This is a reasoning section<channel|>", reasoning="This is a reasoning section", in_thought=True),
    "no_content": Case("<|channel>This is reasoning", reasoning="This is reasoning"),
    "no_reasoning": Case("This is content", content="This is content"),
    "reasoning": Case(
        "<|channel>This is a reasoning section<channel|>This is the rest",
        reasoning="This is a reasoning section",
        content="This is the rest",
    ),
    "complete_reasoning": Case("<|channel>This is a reasoning section<channel|>", reasoning="This is a reasoning section"),
    "multiple_lines": Case(
        "<|channel>This\nThat<channel|>This is the rest\nThat", reasoning="This\nThat", content="This is the rest\nThat"
    ),
    "no_end": Case("<|channel>This is a reasoning section", reasoning="This is a reasoning section"),
    "empty": Case(""),
    "new_line_streaming": Case(
        "Before\n<|channel>This is a reasoning section<channel|>\nThis is the rest",
        reasoning="This is a reasoning section",
        content="Before\n\nThis is the rest",
    ),
    # vllm/reasoning/gemma4_reasoning_parser.py strips the `thought\n` name line only; it keeps
    # the newline before `<channel|>`, which the templates add back when they replay a thought.
    "thought_name_line": Case(
        "<|channel>thought\nFirst, check.\n<channel|>Done.",
        reasoning="First, check.",
        content="Done.",
        note="vLLM returns 'First, check.\\n'; llama.cpp trims it as we do",
    ),
}

# ggml-org/llama.cpp tests/test-chat.cpp, the "Google Gemma 4" peg_tester block
# (models/templates/google-gemma-4-31B-it.jinja).
LLAMA_CPP = {
    "content": Case("Hello, world!", content="Hello, world!"),
    "reasoning_and_content": Case(
        "<|channel>thought\nI'm\nthinking<channel|>Hello, world!\nWhat's up?",
        reasoning="I'm\nthinking",
        content="Hello, world!\nWhat's up?",
    ),
    "empty_reasoning": Case("<|channel>thought<channel|>Hello, world!\nWhat's up?", content="Hello, world!\nWhat's up?"),
    "string_argument": Case(call(f"city:{Q}London{Q}", "get_time"), calls=(("get_time", {"city": "London"}),)),
    "string_with_space": Case(call(f"city:{Q}San Francisco{Q}", "get_time"), calls=(("get_time", {"city": "San Francisco"}),)),
    "empty_args": Case(call("", "empty_args"), calls=(("empty_args", {}),)),
    "content_and_call": Case(
        "Hello, world!\nWhat's up?" + call(f"city:{Q}Paris{Q}", "get_time"),
        content="Hello, world!\nWhat's up?",
        calls=(("get_time", {"city": "Paris"}),),
    ),
    "call_after_reasoning": Case(
        "<|channel>thought\nI'm\nthinking<channel|>" + call(f"city:{Q}Paris{Q}", "get_time"),
        reasoning="I'm\nthinking",
        calls=(("get_time", {"city": "Paris"}),),
    ),
    "parallel_calls": Case(
        call(f"city:{Q}London{Q}", "get_time") + call(f"city:{Q}Paris{Q}", "get_weather"),
        calls=(("get_time", {"city": "London"}), ("get_weather", {"city": "Paris"})),
    ),
    "integer": args_case("arg1:42", {"arg1": 42}),
    "negative": args_case("arg1:-7", {"arg1": -7}),
    "decimal": args_case("orig:3.14", {"orig": 3.14}),
    "true": args_case("enabled:true", {"enabled": True}),
    "false": args_case("enabled:false", {"enabled": False}),
    "null": args_case("value:null", {"value": None}),
    "array": args_case(f"todos:[{Q}buy milk{Q},{Q}walk dog{Q}]", {"todos": ["buy milk", "walk dog"]}),
    "dict": args_case(f"config:{{theme:{Q}dark{Q},count:3}}", {"config": {"theme": "dark", "count": 3}}),
    "empty_array": args_case("todos:[]", {"todos": []}),
    "empty_dict": args_case("config:{}", {"config": {}}),
    "scientific": args_case("orig:1.5e10", {"orig": 1.5e10}),
    "stray_close_after_answer": Case(
        "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<channel|>", content="Hello, world!\nWhat's up?"
    ),
    "empty_channel_after_answer": Case(
        "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<|channel>thought\n<channel|>", content="Hello, world!\nWhat's up?"
    ),
    "empty_channel_and_stray_close_after_answer": Case(
        "<|channel>thought\n<channel|>Hello, world!\nWhat's up?<|channel>thought\n<channel|><channel|>",
        content="Hello, world!\nWhat's up?",
    ),
    "doubled_channel_open": Case("<|channel><|channel>thought\n<channel|>Hello, world!\nWhat's up?", content="Hello, world!\nWhat's up?"),
    "continuation_in_reasoning": Case(
        " thinking<channel|>Hello, world!\nWhat's up?",
        reasoning=" thinking",
        content="Hello, world!\nWhat's up?",
        in_thought=True,
        note="llama.cpp prefixes the prefilled reasoning ('I'm'); the prompt holds that here",
    ),
}

# ollama/ollama model/parsers/gemma4_test.go (TestGemma4Parser and the tests after it).
OLLAMA = {
    "simple_content": Case("This is a simple response.", content="This is a simple response."),
    "thinking_then_content": Case(
        "<|channel>thought\nLet me think about this...<channel|>The answer is 42.",
        reasoning="Let me think about this...",
        content="The answer is 42.",
    ),
    "multiple_thinking_blocks": Case(
        "<|channel>first thought<channel|><|channel>second thought<channel|>Final answer.",
        reasoning="first thoughtsecond thought",
        content="Final answer.",
    ),
    "thinking_only": Case("<|channel>just thinking<channel|>", reasoning="just thinking"),
    "multiple_args": Case(
        call(f"location:{Q}Paris{Q},units:{Q}metric{Q}", "get_weather"),
        calls=(("get_weather", {"location": "Paris", "units": "metric"}),),
    ),
    "null_args": args_case("value:null,nested:{value:null}", {"value": None, "nested": {"value": None}}),
    "nested_object": args_case(f"config:{{enabled:true,name:{Q}test{Q}}}", {"config": {"enabled": True, "name": "test"}}),
    "quoted_strings_in_array": args_case(f'items:[{Q}a{Q},{Q}b "quoted"{Q},{Q}c{Q}]', {"items": ["a", 'b "quoted"', "c"]}),
    "multiline_string": args_case(f"command:{Q}date\n{Q}", {"command": "date\n"}),
    "escaped_quotes_stay_raw": args_case(f'query:{Q}say \\"hello\\"{Q}', {"query": 'say \\"hello\\"'}),
    "unescaped_quotes": args_case(f'query:{Q}say "hello", then "goodbye"{Q}', {"query": 'say "hello", then "goodbye"'}),
    "quoted_url": args_case(
        f'command:{Q}fetch "https://ollama.com/library/gemma4" --extract{Q}',
        {"command": 'fetch "https://ollama.com/library/gemma4" --extract'},
    ),
    "done_without_close_tag": Case(
        f'<|tool_call>call:search{{query:{Q}say "hello" and "bye"{Q}}}',
        calls=(("search", {"query": 'say "hello" and "bye"'}),),
    ),
    "json_and_gemma_quotes": args_case(
        f'query:"raw \\"quoted\\"",note:{Q}gemma "quoted"{Q}', {"query": 'raw "quoted"', "note": 'gemma "quoted"'}
    ),
    "array_of_objects": args_case(
        f'steps:[{{title:{Q}step "one"{Q},done:false}},{{title:{Q}step \\"two\\"{Q},done:true}}]',
        {"steps": [{"title": 'step "one"', "done": False}, {"title": 'step \\"two\\"', "done": True}]},
    ),
    "newlines_between_items": args_case(
        f"edits:[\n  {{newText:{Q}a{Q},\n   oldText:{Q}b{Q}}}\n]", {"edits": [{"newText": "a", "oldText": "b"}]}
    ),
    "spaces_before_keys": args_case(f"edits:[{{ newText:{Q}a{Q}, oldText:{Q}b{Q}}} ]", {"edits": [{"newText": "a", "oldText": "b"}]}),
    "windows_path": args_case(f"path:{Q}C:\\users\\bob\\file.txt{Q}", {"path": "C:\\users\\bob\\file.txt"}),
    "escapes_stay_raw": args_case(
        f"s:{Q}snowman:\\u2603 bad \\x \\uZZZZ https:\\/\\/a{Q}", {"s": "snowman:\\u2603 bad \\x \\uZZZZ https:\\/\\/a"}
    ),
    "punctuation_in_string": args_case(f"query:{Q}a,b:{{c}}[d]{Q}", {"query": "a,b:{c}[d]"}),
    "json_string_with_key_like_text": args_case(
        f'q:"keep , oldText: literal",note:{Q}ok{Q}', {"q": "keep , oldText: literal", "note": "ok"}
    ),
    "thinking_then_call": Case(
        "<|channel>thought\nI need to check the weather<channel|>" + call(f"location:{Q}Paris{Q}", "get_weather"),
        reasoning="I need to check the weather",
        calls=(("get_weather", {"location": "Paris"}),),
    ),
    "content_then_call": Case(
        "Let me check that for you." + call(f"location:{Q}Paris{Q}", "get_weather"),
        content="Let me check that for you.",
        calls=(("get_weather", {"location": "Paris"}),),
    ),
    "channel_with_thinking_off": Case(
        "<|channel>this is not thinking<channel|>actual content",
        reasoning="this is not thinking",
        content="actual content",
        note="ollama drops the channel's text when thinking is off; here it is reasoning, never lost",
    ),
    "tool_response_continuation_starts_in_thinking": Case(
        "The user asked for files.<channel|>go.mod and go.sum",
        reasoning="The user asked for files.",
        content="go.mod and go.sum",
        in_thought=True,
    ),
    "extra_tool_call_close": Case(
        call(f"location:{Q}Paris{Q}", "get_weather") + "<tool_call|>Done.",
        content="Done.",
        calls=(("get_weather", {"location": "Paris"}),),
    ),
    "tool_response_boundary_after_call": Case(
        call(f"location:{Q}Paris{Q}", "get_weather") + "<|tool_response>Done.",
        content="Done.",
        calls=(("get_weather", {"location": "Paris"}),),
    ),
    "split_channel_tags": Case("<|channel>thinking here<channel|>content", reasoning="thinking here", content="content"),
    "single_quoted_value": args_case("pattern:':\\s*\\w+'", {"pattern": ":\\s*\\w+"}),
    "single_quoted_middle_value": args_case(
        f"include:{Q}*.py{Q},pattern:'abc',path:{Q}/tmp{Q}", {"include": "*.py", "pattern": "abc", "path": "/tmp"}
    ),
    "quoted_scalars_stay_strings": args_case(f"n:{Q}1{Q},b:{Q}true{Q},z:{Q}null{Q}", {"n": "1", "b": "true", "z": "null"}),
    "unquoted_scalars": args_case("n:1,b:true,z:null", {"n": 1, "b": True, "z": None}),
    "reference_example": args_case(
        f"detail_level:0,location:{Q}Paris, France{Q},unit:{Q}celsius{Q}",
        {"detail_level": 0, "location": "Paris, France", "unit": "celsius"},
    ),
    "json_string_with_structure": args_case('q:"a,b:c"', {"q": "a,b:c"}),
    "raw_string_before_next_key": args_case(f"content:hello,mode:{Q}fast{Q}", {"content": "hello", "mode": "fast"}),
    "invalid_json_escape": strict_case('path:"C:\\users\\bob\\file.txt"', "Invalid \\uXXXX escape", ""),
    "unclosed_gemma_string": strict_case(
        f"command:{Q}ls", "unterminated string", "ollama closes the string from the tool's schema; where it ends is a guess"
    ),
    "dangling_delimiter_after_single_quotes": strict_case(
        f"pattern:':\\s*\\w+'{Q}", "expected ',' or '}'", "ollama drops the stray quote token by a repair rule"
    ),
    "non_terminal_unclosed_string": strict_case(f"first:{Q}one,second:{Q}two{Q}", "expected ',' or '}'", ""),
}

# This project's own cases: April-style literals, framing, in-thought starts, forced openings.
OURS = {
    # Keys as llama.cpp's common/chat.cpp reads them (`gemma4-dict-key`: any text up to the
    # colon) and as the July 2026 template writes them (bare, identifiers or not).
    "non_identifier_keys": args_case(f"a b:[1,{{z:true}}],k-1:{Q}x{Q}", {"a b": [1, {"z": True}], "k-1": "x"}),
    "april_python_literals": args_case("a:None,b:True,c:False", {"a": None, "b": True, "c": False}),
    "ambiguous_bare_value": strict_case("unit:celsius deg:2", "is ambiguous", ""),
    "spaces_in_list_item": strict_case("xs:[1 2]", "is ambiguous", ""),
    "thought_with_blank_lines": Case("<|channel>thought\n\nStep one.\n\n<channel|>Answer.", reasoning="\nStep one.\n", content="Answer."),
    "in_thought_then_call": Case(
        "Checking the weather first.\n<channel|>" + call(f"city:{Q}Paris{Q}", "get_weather"),
        reasoning="Checking the weather first.",
        calls=(("get_weather", {"city": "Paris"}),),
        in_thought=True,
    ),
    "forced_call_after_open_thought": Case(
        "<channel|><|tool_call>call:get_weather{" + f"city:{Q}Paris{Q}}}<tool_call|>",
        calls=(("get_weather", {"city": "Paris"}),),
        in_thought=True,
    ),
    "unclosed_thought_keeps_its_newline": Case("<|channel>thought\nrunning out\n", reasoning="running out\n"),
    "call_inside_thought_is_thought": Case(
        "<|channel>thought\nmaybe <|tool_call>call:x{}<tool_call|>?<channel|>no",
        reasoning="maybe <|tool_call>call:x{}<tool_call|>?",
        content="no",
    ),
    "restarted_call": Case(
        f"<|tool_call>call:f{{a:{Q}x" + call("a:1"),
        calls=(("f", {"a": 1}),),
        invalid=(("f", "not closed"),),
    ),
    "complete_call_then_text_unclosed": Case("<|tool_call>call:f{a:1} and more", invalid=(("f", "not closed"),)),
}

SOURCES = {
    "vllm tool parser": VLLM_TOOLS,
    "vllm reasoning parser": VLLM_REASONING,
    "llama.cpp": LLAMA_CPP,
    "ollama": OLLAMA,
    "ours": OURS,
}
CASES = [pytest.param(case, id=f"{source}:{name}") for source, cases in SOURCES.items() for name, case in cases.items()]


def parse(case: Case, pieces: list[str]) -> dict:
    return summary(drain(Gemma4OutputParser(in_thought=case.in_thought), pieces))


@pytest.mark.parametrize("case", CASES)
def test_reference_case(case: Case) -> None:
    result = parse(case, [case.text])
    assert (result["content"], result["reasoning"]) == (case.content, case.reasoning)
    assert [(name, args) for _, name, args in result["calls"]] == list(case.calls)
    assert len(result["invalid"]) == len(case.invalid)
    for (_, name, raw, error), (want_name, reason) in zip(result["invalid"], case.invalid):
        assert name == want_name and reason in error
        assert raw.startswith("<|tool_call>") and raw in case.text  # the call's text as the model wrote it
    indexes = sorted(c[0] for c in result["calls"] + result["invalid"])
    assert indexes == list(range(len(indexes)))


@pytest.mark.parametrize("case", CASES)
def test_every_split_into_two_parses_as_the_whole(case: Case) -> None:
    whole = parse(case, [case.text])
    for cut in range(len(case.text) + 1):
        assert parse(case, [case.text[:cut], case.text[cut:]]) == whole, f"split at {cut}"


ALL_CASES = [case for cases in SOURCES.values() for case in cases.values()]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ALL_CASES), st.lists(st.integers(min_value=0), max_size=12))
def test_any_pieces_parse_as_the_whole(case: Case, cuts: list[int]) -> None:
    assert parse(case, split_at(case.text, cuts)) == parse(case, [case.text])


@pytest.mark.parametrize("case", CASES)
def test_one_character_at_a_time_parses_as_the_whole(case: Case) -> None:
    assert parse(case, list(case.text)) == parse(case, [case.text])
