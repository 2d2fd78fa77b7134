"""The fixture tokenizer and our Gemma 4 chat template: exact renders, tokenizer round trips, single-id markers."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_gemma_mtp.formats import Gemma4OutputParser, ParsedDelta, to_gemma4_value
from langchain_gemma_mtp.testing import TOKENIZER_DIR

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>",
    '<|"|>', "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City"}},
            "required": ["city"],
        },
    },
}
DECLARATION = (
    '<|tool>declaration:get_weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{description:'
    '<|"|>City<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
)
AGENT_STEP = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "call_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    {"role": "assistant", "content": "It is sunny and 21C in Paris."},
]
# Copied from shared/gemma4-format.md.
DOC_EXAMPLE = """\
<bos><|turn>system
You are helpful.<|tool>declaration:get_weather{description:<|"|>Weather<|"|>,parameters:{properties:{city:{description:<|"|>City<|"|>,type:<|"|>STRING<|"|>}},required:[<|"|>city<|"|>],type:<|"|>OBJECT<|"|>}}<tool|><turn|>
<|turn>user
Weather in Paris?<turn|>
<|turn>model
<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>response:get_weather{value:<|"|>sunny, 21C<|"|>}<tool_response|>It is sunny and 21C in Paris.<turn|>
"""


@functools.cache
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def render(messages: list[dict], tools: list[dict] | None = None, generation: bool = True, **kwargs) -> str:
    return tokenizer().apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation, tokenize=False, **kwargs
    )


# -- the fixture ---------------------------------------------------------------------------------


def test_fixture_is_small_and_its_template_is_the_source_one() -> None:
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 1_000_000
    assert (TOKENIZER_DIR / "chat_template.jinja").read_text() == (FIXTURES / "gemma4_chat_template.jinja").read_text()


def test_special_tokens_have_fixed_single_ids() -> None:
    tok = tokenizer()
    assert len(tok) == 4096
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.encode(token, add_special_tokens=False) == [token_id]
        assert tok.encode(f"a{token}b", add_special_tokens=False)[1:-1] == [token_id]
        assert tok.decode([token_id]) == token


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_unicode_text_round_trips(text: str) -> None:
    tok = tokenizer()
    assert tok.decode(tok.encode(text)) == text


# -- rendering -----------------------------------------------------------------------------------


def test_the_doc_agent_step_renders_byte_for_byte() -> None:
    assert render(AGENT_STEP, [WEATHER_TOOL], generation=False) == DOC_EXAMPLE


def test_rendered_prompts_tokenize_and_decode_unchanged_with_markers_as_single_ids() -> None:
    tok = tokenizer()
    for text in (DOC_EXAMPLE, render(AGENT_STEP[:2], [WEATHER_TOOL], enable_thinking=True)):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        for token_id, token in enumerate(SPECIAL_TOKENS):
            assert ids.count(token_id) == text.count(token), token


def test_thinking_off_closes_an_empty_channel_in_the_generation_prompt() -> None:
    text = render(AGENT_STEP[:2], [WEATHER_TOOL], enable_thinking=False)
    assert text == (
        "<bos><|turn>system\nYou are helpful." + DECLARATION + "<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )
    assert render(AGENT_STEP[:2], [WEATHER_TOOL]) == text  # thinking is off unless asked for


def test_thinking_on_puts_think_at_the_top_of_the_system_turn() -> None:
    text = render(AGENT_STEP[:2], [WEATHER_TOOL], enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\nYou are helpful." + DECLARATION + "<turn|>\n"
        "<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    )


def test_thinking_on_without_a_system_message_makes_a_system_turn() -> None:
    assert render([{"role": "user", "content": "Hi"}], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )


def test_no_system_message_and_no_tools_means_no_system_turn() -> None:
    assert render([{"role": "user", "content": "Hi"}]) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_tools_without_a_system_message_get_a_system_turn_of_their_own() -> None:
    text = render([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL])
    assert text.startswith("<bos><|turn>system\n" + DECLARATION + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n")


def test_list_content_parts_render_as_their_text() -> None:
    parts = [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]
    assert render([{"role": "user", "content": parts}]) == render([{"role": "user", "content": "Weather in Paris?"}])
    system = [{"role": "system", "content": [{"type": "text", "text": "You are helpful."}]}]
    assert render(system + AGENT_STEP[1:], [WEATHER_TOOL], generation=False) == DOC_EXAMPLE


def test_after_tool_responses_the_model_goes_on_in_its_open_turn() -> None:
    text = render(AGENT_STEP[:4], [WEATHER_TOOL], enable_thinking=False)
    assert text.endswith('{value:<|"|>sunny, 21C<|"|>}<tool_response|>')


def test_tool_responses_find_their_tool_by_name_by_id_or_by_position() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "first", "arguments": {}}},
        {"id": "b", "type": "function", "function": {"name": "second", "arguments": {"n": 2}}},
    ]
    history = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "On it.", "tool_calls": calls}]
    by_id = [
        {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
    ]
    by_position = [{"role": "tool", "content": "1"}, {"role": "tool", "content": "2"}]
    by_name = [{"role": "tool", "name": "second", "content": "2"}]
    assert render(history + by_id).endswith(
        "<|turn>model\nOn it.<|tool_call>call:first{}<tool_call|><|tool_call>call:second{n:2}<tool_call|>"
        '<|tool_response>response:second{value:<|"|>2<|"|>}<tool_response|>'
        '<|tool_response>response:first{value:<|"|>1<|"|>}<tool_response|>'
    )
    assert render(history + by_position).endswith(
        '<|tool_response>response:first{value:<|"|>1<|"|>}<tool_response|>'
        '<|tool_response>response:second{value:<|"|>2<|"|>}<tool_response|>'
    )
    assert render(history + by_name).endswith('response:second{value:<|"|>2<|"|>}<tool_response|>')


def test_a_user_message_after_tool_calls_closes_the_model_turn() -> None:
    history = AGENT_STEP[:4] + [{"role": "user", "content": "And Rome?"}]
    assert render(history, [WEATHER_TOOL]).endswith(
        "<tool_response|><turn|>\n<|turn>user\nAnd Rome?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_declarations_upper_case_types_and_quote_odd_keys() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object",
        "properties": {"type": {"type": ["string", "null"], "enum": ["a", "b"]}, "max-size": {"type": "integer"}},
    }}}
    assert (
        '<|tool>declaration:f{parameters:{properties:{<|"|>max-size<|"|>:{type:<|"|>INTEGER<|"|>},'
        'type:{enum:[<|"|>a<|"|>,<|"|>b<|"|>],type:[<|"|>STRING<|"|>,<|"|>NULL<|"|>]}},type:<|"|>OBJECT<|"|>}}<tool|>'
    ) in render([{"role": "user", "content": "x"}], [tool])


def test_string_arguments_are_refused_with_a_clear_message() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    with pytest.raises(Exception, match="json.loads"):
        render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}])


def test_non_text_content_parts_are_refused() -> None:
    with pytest.raises(Exception, match="only text content parts"):
        render([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}])


# -- the template and the parser agree -----------------------------------------------------------

key = st.text(max_size=8).filter(lambda s: '<|"|>' not in s and "<tool_call|>" not in s and "<|tool_call>" not in s)
value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | key,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(key, children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(key, value, max_size=4))
def test_template_renders_arguments_like_to_gemma4_value_and_the_parser_reads_them_back(args: dict) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}
    text = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}],
                  generation=False)
    rendered = "<|tool_call>call:f" + to_gemma4_value(args) + "<tool_call|>"
    assert text.endswith("<|turn>model\n" + rendered)
    parser = Gemma4OutputParser({"f"})
    total = ParsedDelta()
    total.extend(parser.feed(rendered))
    total.extend(parser.finish())
    [parsed] = total.tool_calls
    assert json.loads(parsed.arguments) == args
