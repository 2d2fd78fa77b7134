"""The fixture tokenizer and its chat template (ours, rendering what Google's July 2026 E2B/E4B template
renders): exact renders, tokenizer round trips, single-id markers. Every revision is checked against
the published renders in test_gemma4_revisions.py; here are the facts the rest of the package leans on."""

from __future__ import annotations

import functools
import json

import pytest
from gemma4_revisions import revision
from hypothesis import given, settings
from hypothesis import strategies as st

from langchain_gemma_mtp.formats import Gemma4OutputParser, ParsedDelta, to_gemma4_value
from langchain_gemma_mtp.testing import TOKENIZER_DIR

SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<|turn>",
    "<turn|>",
    "<|think|>",
    "<|channel>",
    "<channel|>",
    '<|"|>',
    "<|tool>",
    "<tool|>",
    "<|tool_call>",
    "<tool_call|>",
    "<|tool_response>",
    "<tool_response|>",
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
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
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
    return tokenizer().apply_chat_template(messages, tools=tools, add_generation_prompt=generation, tokenize=False, **kwargs)


# -- the fixture ---------------------------------------------------------------------------------


def test_fixture_is_small_and_its_template_is_the_source_one() -> None:
    assert sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir()) < 1_000_000
    assert (TOKENIZER_DIR / "chat_template.jinja").read_text() == revision("july_e2b").template


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


def test_thinking_off_ends_the_generation_prompt_at_the_model_turn() -> None:
    # The E2B/E4B form; 26B/31B templates would close an empty thought channel after it.
    text = render(AGENT_STEP[:2], [WEATHER_TOOL], enable_thinking=False)
    assert text == ("<bos><|turn>system\nYou are helpful." + DECLARATION + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n")
    assert render(AGENT_STEP[:2], [WEATHER_TOOL]) == text  # thinking is off unless asked for


def test_thinking_on_puts_think_at_the_top_of_the_system_turn() -> None:
    text = render(AGENT_STEP[:2], [WEATHER_TOOL], enable_thinking=True)
    assert text == (
        "<bos><|turn>system\n<|think|>\nYou are helpful." + DECLARATION + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n<|turn>model\n"
    )


def test_thinking_on_without_a_system_message_makes_a_system_turn() -> None:
    assert render([{"role": "user", "content": "Hi"}], enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )


def test_no_system_message_and_no_tools_means_no_system_turn() -> None:
    assert render([{"role": "user", "content": "Hi"}]) == ("<bos><|turn>user\nHi<turn|>\n<|turn>model\n")


def test_tools_without_a_system_message_get_a_system_turn_of_their_own() -> None:
    text = render([{"role": "user", "content": "Weather in Paris?"}], [WEATHER_TOOL])
    assert text.startswith("<bos><|turn>system\n" + DECLARATION + "<turn|>\n<|turn>user\nWeather in Paris?<turn|>\n")


def test_list_content_parts_render_as_their_text() -> None:
    # Each part is trimmed, and parts join with nothing between them.
    parts = [{"type": "text", "text": "Weather in "}, {"type": "text", "text": " Paris?"}]
    assert render([{"role": "user", "content": parts}]) == render([{"role": "user", "content": "Weather inParis?"}])
    # A system message's parts are each trimmed and followed by a space.
    system = [{"role": "system", "content": [{"type": "text", "text": " You are "}, {"type": "text", "text": "helpful."}]}]
    assert render(system + AGENT_STEP[1:], [WEATHER_TOOL], generation=False) == DOC_EXAMPLE.replace("You are helpful.", "You are helpful. ")


def test_after_tool_responses_the_model_goes_on_in_its_open_turn() -> None:
    text = render(AGENT_STEP[:4], [WEATHER_TOOL], enable_thinking=False)
    assert text.endswith('{value:<|"|>sunny, 21C<|"|>}<tool_response|>')


def test_with_thinking_on_the_prompt_after_tool_responses_opens_a_thought_channel() -> None:
    text = render(AGENT_STEP[:4], [WEATHER_TOOL], enable_thinking=True)
    assert text.endswith('{value:<|"|>sunny, 21C<|"|>}<tool_response|><|channel>thought\n')


def test_reasoning_of_a_tool_call_turn_is_replayed_in_a_thought_channel() -> None:
    step = {**AGENT_STEP[2], "reasoning_content": "Paris weather needed."}
    text = render([*AGENT_STEP[:2], step, AGENT_STEP[3]], [WEATHER_TOOL], enable_thinking=True)
    assert "<|turn>model\n<|channel>thought\nParis weather needed.\n<channel|><|tool_call>call:get_weather" in text


def test_tool_responses_find_their_tool_by_id_or_by_name_and_text_follows_them() -> None:
    calls = [
        {"id": "a", "type": "function", "function": {"name": "first", "arguments": {}}},
        {"id": "b", "type": "function", "function": {"name": "second", "arguments": {"n": 2}}},
    ]
    history = [{"role": "user", "content": "go"}, {"role": "assistant", "content": "On it.", "tool_calls": calls}]
    by_id = [
        {"role": "tool", "tool_call_id": "b", "content": "2"},
        {"role": "tool", "tool_call_id": "a", "content": "1"},
    ]
    by_name = [{"role": "tool", "name": "second", "content": "2"}]
    neither = [{"role": "tool", "content": "1"}]
    # Calls, then their responses, then the message's text, which closes the turn.
    assert render(history + by_id).endswith(
        "<|turn>model\n<|tool_call>call:first{}<tool_call|><|tool_call>call:second{n:2}<tool_call|>"
        '<|tool_response>response:second{value:<|"|>2<|"|>}<tool_response|>'
        '<|tool_response>response:first{value:<|"|>1<|"|>}<tool_response|>On it.<turn|>\n'
    )
    assert 'response:second{value:<|"|>2<|"|>}<tool_response|>' in render(history + by_name)
    assert 'response:unknown{value:<|"|>1<|"|>}<tool_response|>' in render(history + neither)


def test_a_user_message_after_tool_calls_closes_the_model_turn() -> None:
    history = AGENT_STEP[:4] + [{"role": "user", "content": "And Rome?"}]
    assert render(history, [WEATHER_TOOL]).endswith("<tool_response|><turn|>\n<|turn>user\nAnd Rome?<turn|>\n<|turn>model\n")


def test_declarations_upper_case_types_and_keep_keys_bare() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"mode": {"type": "string", "enum": ["a", "b"]}, "max-size": {"type": "integer"}},
            },
        },
    }
    assert (
        '<|tool>declaration:f{description:<|"|><|"|>,parameters:{properties:{max-size:{type:<|"|>INTEGER<|"|>},'
        'mode:{enum:[<|"|>a<|"|>,<|"|>b<|"|>],type:<|"|>STRING<|"|>}},type:<|"|>OBJECT<|"|>}}<tool|>'
    ) in render([{"role": "user", "content": "x"}], [tool])


def test_string_arguments_are_refused_with_a_clear_message() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    with pytest.raises(Exception, match="Deserialize arguments"):
        render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}])


# -- the template and the parser agree -----------------------------------------------------------

# Lower-case identifier keys: for them the template (bare keys, sorted case-insensitively) and
# to_gemma4_value (which quotes other keys and sorts case-sensitively) agree.
key = st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True)
text_value = st.text(max_size=8).filter(lambda s: '<|"|>' not in s and "<tool_call|>" not in s and "<|tool_call>" not in s)
value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | text_value,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(key, children, max_size=3),
    max_leaves=10,
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(key, value, max_size=4))
def test_template_renders_arguments_like_to_gemma4_value_and_the_parser_reads_them_back(args: dict) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}
    text = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}], generation=False)
    rendered = "<|tool_call>call:f" + to_gemma4_value(args) + "<tool_call|>"
    # A call with no response yet ends the prompt with the response marker, for the tool runner.
    assert text.endswith("<|turn>model\n" + rendered + "<|tool_response>")
    parser = Gemma4OutputParser({"f"})
    total = ParsedDelta()
    total.extend(parser.feed(rendered))
    total.extend(parser.finish())
    [parsed] = total.tool_calls
    assert json.loads(parsed.arguments) == args
