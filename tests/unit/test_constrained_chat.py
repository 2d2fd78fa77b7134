"""Constrained chat answers (runtime + formats/grammar.py): strict tool calls and JSON answers always parse and validate.

Random JSON schemas (hypothesis) and the held tool sets (benchmarks/workloads.jsonl, the chat
fixtures' tools) are given to an untrained tiny Gemma 4 (random weights, sampled): left alone it
writes no call at all, so every valid call below is the grammar's doing. Calls are read back by the
runtime's own Gemma 4 parser and validated with `jsonschema`. Schemas the grammar cannot enforce
fail with a GrammarError naming the schema part, before any forward.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from langchain_gemma_mtp.chat_templates import FALLBACK_CHAT_TEMPLATE
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import NgramDrafter
from langchain_gemma_mtp.errors import GrammarError
from langchain_gemma_mtp.formats.grammar import SAFE_INTEGER
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime
from langchain_gemma_mtp.testing import TOKENIZER_DIR, build_chat_target

WORKLOADS = Path(__file__).resolve().parents[2] / "benchmarks" / "workloads.jsonl"
FIXTURE_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "plan",
            "parameters": {
                "type": "object",
                "properties": {
                    "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "maxItems": 2},
                    "done": {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
                    "with space": {"type": "number"},
                },
                "required": ["steps"],
                "additionalProperties": False,
                "$defs": {"step": {"type": "object", "properties": {"say": {"type": "string", "maxLength": 6}}, "required": ["say"]}},
            },
        },
    },
]


def held_tools() -> list[dict]:
    tools = {t["function"]["name"]: t for line in WORKLOADS.read_text().splitlines() for t in json.loads(line).get("tools", [])}
    return [*tools.values(), *FIXTURE_TOOLS]


@pytest.fixture(scope="module")
def runtime() -> ChatRuntime:
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    return ChatRuntime(Engine(build_chat_target(seed=21), NgramDrafter(), tokenizer, prefix_cache_mb=0))


@pytest.fixture(scope="module")
def json_runtime(runtime) -> ChatRuntime:
    """The same model on a template without Gemma 4's tool syntax: calls in the JSON convention (the 270M's path)."""
    return ChatRuntime(runtime.engine, chat_template=FALLBACK_CHAT_TEMPLATE)


def _strict(tool: dict) -> dict:
    return {**tool, "function": {**tool["function"], "strict": True}}


def ask(runtime: ChatRuntime, seed: int, **options) -> dict:
    """A sampled answer; the bias on the closing markers only makes random weights end free strings,
    numbers, objects and lists sooner (an untrained model would take thousands of tokens): what may follow stays the grammar's."""
    vocab = runtime.tokenizer.get_vocab()
    bias = {vocab['<|"|>']: 7.0, vocab["]"]: 2.0, vocab['"']: 5.0, vocab["}"]: 2.5}
    options.setdefault("max_tokens", 700)
    request = ChatRequest(messages=[{"role": "user", "content": "go"}], temperature=1.0, seed=seed, logit_bias=bias, **options)
    return runtime.complete(request)


def assert_valid_calls(message: dict, tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert message["finish_reason"] == "tool_calls" and not message["invalid_tool_calls"], message
    assert message["tool_calls"]
    for call in message["tool_calls"]:
        jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])


@pytest.mark.parametrize("index", range(len(held_tools())), ids=[t["function"]["name"] for t in held_tools()])
def test_every_held_tool_gets_calls_that_parse_and_match_its_schema(runtime, index) -> None:
    tools = [_strict(t) for t in held_tools()]
    name = tools[index]["function"]["name"]
    for seed in range(3):
        message = ask(runtime, seed, tools=tools, tool_choice=name, parallel_tool_calls=False)
        assert_valid_calls(message, tools)
        assert message["tool_calls"][0]["function"]["name"] == name
    # "required" with the whole set: any tool, each call valid for the one it names.
    assert_valid_calls(ask(runtime, 7, tools=tools, tool_choice="required", parallel_tool_calls=False), tools)


def test_without_a_grammar_the_random_model_writes_no_valid_call(runtime) -> None:
    """The check above is not vacuous: the same model and seeds, unconstrained (no strict, no
    forced choice), write no call that parses."""
    tools = held_tools()
    for seed in range(3):
        message = ask(runtime, seed, tools=tools, max_tokens=60)
        assert not message["tool_calls"], message


# -- random schemas ---------------------------------------------------------------------------------

KEYS = st.one_of(st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True), st.sampled_from(["with space", "k-1", "Ünï"]))
SCALARS = st.one_of(
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.just({"type": "integer"}),
    st.builds(
        lambda low, span: {"type": "integer", "minimum": low, "exclusiveMaximum": low + span}, st.integers(-50, 50), st.integers(1, 100)
    ),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(
        lambda v: {"enum": v},
        st.lists(st.one_of(st.text(max_size=4), st.integers(-9, 99), st.booleans()), min_size=1, max_size=3, unique=True),
    ),
)


def _object(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(KEYS, children, max_size=3).flatmap(
        lambda props: st.builds(
            lambda required: {"type": "object", "properties": props, "required": required, "additionalProperties": False},
            st.lists(st.sampled_from(sorted(props)), unique=True) if props else st.just([]),
        )
    )


SCHEMAS = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        _object(children),
        st.builds(lambda items, m: {"type": "array", "items": items, "maxItems": m}, children, st.integers(0, 3)),
        st.builds(lambda a, b: {"anyOf": [a, b]}, children, children),
    ),
    max_leaves=6,
)
PARAMETERS = _object(SCHEMAS)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(parameters=PARAMETERS, seed=st.integers(0, 2**16))
def test_random_schemas_give_calls_that_parse_and_validate(runtime, parameters, seed) -> None:
    tools = [_strict({"type": "function", "function": {"name": "f", "parameters": parameters}})]
    assert_valid_calls(ask(runtime, seed, tools=tools, tool_choice="f", parallel_tool_calls=False), tools)


def _bounded_numbers(schema):
    """The schema with unbounded numbers made bounded integers: JSON numbers have no length limit
    of their own (docs/tool-calling.md, Limits), and random weights would write digits forever."""
    if isinstance(schema, dict):
        if schema.get("type") in ("integer", "number") and "minimum" not in schema:
            return {"type": "integer", "minimum": -999, "maximum": 999}
        return {k: _bounded_numbers(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_bounded_numbers(v) for v in schema]
    return schema


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(schema=PARAMETERS.map(_bounded_numbers), seed=st.integers(0, 2**16))
def test_random_schemas_give_json_answers_that_validate(runtime, schema, seed) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    message = ask(runtime, seed, response_format=response_format)
    assert message["finish_reason"] == "stop", message
    jsonschema.validate(json.loads(message["content"]), schema)


def test_json_object_mode_gives_an_object(runtime) -> None:
    for seed in range(3):
        message = ask(runtime, seed, response_format={"type": "json_object"}, max_tokens=400)
        if message["finish_reason"] == "stop":  # free keys and strings may run out of tokens
            assert isinstance(json.loads(message["content"]), dict)
        else:
            assert message["content"].startswith("{")


# -- answers that end within max_tokens ----------------------------------------------------------------

NOTE = {
    "type": "function",
    "function": {
        "name": "note",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "title": {"type": "string", "maxLength": 300}},
            "required": ["text", "title"],
            "additionalProperties": False,
        },
    },
}


def _call(runtime: ChatRuntime, text: str, title: str) -> str:
    if runtime.native_tools:
        return f'<|tool_call>call:note{{text:<|"|>{text}<|"|>,title:<|"|>{title}<|"|>}}<tool_call|>'
    return '<tool_call>{"name": "note", "arguments": ' + json.dumps({"text": text, "title": title}) + "}</tool_call>"


@pytest.mark.parametrize("convention", ["gemma4", "json"])
def test_free_strings_are_capped_from_max_tokens_and_a_schemas_max_length_wins(runtime, json_runtime, convention) -> None:
    """max_tokens 40, one free string: it holds 40 // 2 = 20 characters at most; the 300 of
    `title`'s own maxLength stay (so it may outgrow the cap), and a larger budget lifts the cap."""
    chat = runtime if convention == "gemma4" else json_runtime
    small = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=[NOTE], max_tokens=40)
    assert _accepts(chat, small, _call(chat, "a" * 20, "t" * 300))
    assert not _accepts(chat, small, _call(chat, "a" * 21, "t"))
    assert not _accepts(chat, small, _call(chat, "a", "t" * 301))
    assert _accepts(chat, replace(small, max_tokens=400), _call(chat, "a" * 200, "t"))


COUNT = {
    "type": "function",
    "function": {
        "name": "count",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"n": {"type": "integer"}, "m": {"type": "integer", "maximum": 10**18}},
            "required": ["n", "m"],
            "additionalProperties": False,
        },
    },
}


def test_an_unbounded_json_integer_stays_in_the_safe_range_and_a_schemas_bound_wins(json_runtime) -> None:
    """A weak model fills an unbounded integer with digits to the end of the budget: on the JSON
    path an integer without bounds of its own takes JSON's safe range; a bound the schema sets stays."""
    request = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=[COUNT], max_tokens=400)

    def call(n: int, m: int) -> str:
        return '<tool_call>{"name": "count", "arguments": ' + json.dumps({"n": n, "m": m}) + "}</tool_call>"

    assert _accepts(json_runtime, request, call(SAFE_INTEGER, 10**18))
    assert _accepts(json_runtime, request, call(-SAFE_INTEGER, -SAFE_INTEGER))
    assert not _accepts(json_runtime, request, call(SAFE_INTEGER + 1, 0))
    assert not _accepts(json_runtime, request, call(0, -SAFE_INTEGER - 1))


@pytest.mark.parametrize("convention", ["gemma4", "json"])
def test_a_named_tool_choice_makes_exactly_one_call(runtime, json_runtime, convention) -> None:
    """As vLLM: a named choice constrains the answer to that one call (no parallel_tool_calls
    needed); "required" may make several. The answers end with the call, within max_tokens."""
    chat = runtime if convention == "gemma4" else json_runtime
    tools = [NOTE, _strict(held_tools()[0])]
    call = _call(chat, "hi", "t")
    separator = "" if chat.native_tools else "\n"
    named = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=tools, tool_choice="note")
    required = replace(named, tool_choice="required")
    forced = chat.prepare(named).forced
    assert _accepts(chat, named, call.removeprefix(forced)) and not _accepts(chat, named, (call + separator + call).removeprefix(forced))
    forced = chat.prepare(required).forced
    assert _accepts(chat, required, (call + separator + call).removeprefix(forced))
    for seed in range(3):  # (not `note`: its title's own maxLength of 300 may outgrow 60 tokens)
        message = ask(chat, seed, tools=tools, tool_choice="get_weather", max_tokens=60)
        assert_valid_calls(message, tools)
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize("convention", ["gemma4", "json"])
@settings(
    max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(parameters=PARAMETERS.map(_bounded_numbers), budget=st.integers(96, 160), seed=st.integers(0, 2**16))
def test_random_schemas_within_tight_budgets_end_complete(runtime, json_runtime, convention, parameters, budget, seed) -> None:
    """No bias toward closing anything: the cap on free strings and the single named call alone
    make every answer of random weights end with its call complete and valid. ("required" may make
    several calls; the budget's end keeps each within max_tokens only as far as the longest call
    so far predicts the next, so random schemas with optional keys can outgrow it: the engine
    test checks that rule.) Budgets from 96: keys, quotes and braces alone take up to about 50
    tokens of this small vocabulary in these schemas, and no cap on strings makes them fit less."""
    chat = runtime if convention == "gemma4" else json_runtime
    tools = [_strict({"type": "function", "function": {"name": "f", "parameters": parameters}})]
    request = ChatRequest(
        messages=[{"role": "user", "content": "go"}], tools=tools, tool_choice="f", temperature=1.0, seed=seed, max_tokens=budget
    )
    message = chat.complete(request)
    assert_valid_calls(message, tools)
    assert len(message["tool_calls"]) == 1 and message["usage"]["completion_tokens"] <= budget


# Budgets from 96, as for calls: optional keys and nested objects are not bounded by any cap, and
# a full run found a random model filling a 48-token budget with them. Derandomized, so CI runs
# the examples a developer ran.
@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(schema=PARAMETERS.map(_bounded_numbers), budget=st.integers(96, 160), seed=st.integers(0, 2**16))
def test_random_json_answers_within_tight_budgets_end_complete(json_runtime, schema, budget, seed) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    request = ChatRequest(
        messages=[{"role": "user", "content": "go"}], response_format=response_format, temperature=1.0, seed=seed, max_tokens=budget
    )
    message = json_runtime.complete(request)
    assert message["finish_reason"] == "stop", message
    jsonschema.validate(json.loads(message["content"]), schema)


# -- thinking and bad schemas -----------------------------------------------------------------------


def _accepts(runtime: ChatRuntime, request: ChatRequest, text: str) -> bool:
    grammar = runtime.prepare(request).constraint
    matcher = grammar.matcher()
    ids = runtime.tokenizer.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def test_a_thought_may_come_before_strict_calls_only_when_thinking_is_on(runtime) -> None:
    tools = [_strict(held_tools()[0])]
    call = '<|tool_call>call:get_weather{city:<|"|>Lisbon<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
    thought = "<|channel>thought\nThe user wants Lisbon.<channel|>"
    on = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=tools, reasoning=True)
    off = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=tools)
    assert _accepts(runtime, on, thought + call) and _accepts(runtime, on, "Sure. " + call)
    assert not _accepts(runtime, off, thought + call) and _accepts(runtime, off, call)
    assert not _accepts(runtime, off, call.replace("celsius", "kelvin"))  # enum enforced
    assert not _accepts(runtime, off, call.replace('city:<|"|>Lisbon<|"|>,', ""))  # required key enforced
    assert not _accepts(runtime, off, "<|tool_call>call:nope{}<tool_call|>")  # only declared tools
    # Strictness is per tool: a non-strict tool beside a strict one takes any arguments object.
    mixed = ChatRequest(messages=[{"role": "user", "content": "go"}], tools=[*tools, held_tools()[1]])
    assert _accepts(runtime, mixed, "<|tool_call>call:search_docs{anything:[1,true]}<tool_call|>")
    assert not _accepts(runtime, mixed, call.replace("celsius", "kelvin"))


def test_with_thinking_on_a_forced_call_or_json_answer_may_follow_a_thought(runtime) -> None:
    """Thinking on, the forced opening moves from the prompt into the grammar: the model may reason
    first, then only the call (or JSON) may follow; the thought is capped to leave the answer room."""
    tools = [_strict(held_tools()[0])]
    call = '<|tool_call>call:get_weather{city:<|"|>Lisbon<|"|>,unit:<|"|>celsius<|"|>}<tool_call|>'
    thought = "<|channel>thought\nThe user wants Lisbon.<channel|>"
    forced = ChatRequest(
        messages=[{"role": "user", "content": "go"}], tools=tools, tool_choice="get_weather", reasoning=True, max_tokens=200
    )
    assert runtime.prepare(forced).forced == ""
    assert _accepts(runtime, forced, thought + call) and _accepts(runtime, forced, call)
    assert not _accepts(runtime, forced, thought + "Sure. " + call) and not _accepts(runtime, forced, thought)
    too_long = runtime.tokenizer.encode("<|channel>thought\n" + "x" * (200 // 4 + 1), add_special_tokens=False)
    matcher = runtime.prepare(forced).constraint.matcher()
    assert matcher.try_consume_tokens(too_long) < len(too_long)
    # Thinking off: the opening ends the prompt, as before.
    assert runtime.prepare(replace(forced, reasoning=False)).forced == "<|tool_call>call:get_weather{"
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
    answer = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}}
    json_on = ChatRequest(messages=[{"role": "user", "content": "go"}], response_format=answer, reasoning=True, max_tokens=200)
    assert runtime.prepare(json_on).forced == ""
    assert _accepts(runtime, json_on, thought + '{"a": 1}') and not _accepts(runtime, json_on, thought + "no")


def test_with_thinking_on_forced_calls_come_after_a_thought_and_still_validate(runtime) -> None:
    tools = [_strict(t) for t in held_tools()]
    thoughts = []
    for seed in range(3):
        message = ask(runtime, seed, tools=tools, tool_choice="get_weather", reasoning=True, max_tokens=160)
        assert_valid_calls(message, tools)
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
        thoughts.append(message["reasoning"])
    assert any(thoughts)  # the random model opened a thought on some seed, and the call still came


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {
                "tools": [
                    _strict(
                        {
                            "type": "function",
                            "function": {
                                "name": "f",
                                "parameters": {"type": "object", "properties": {"when": {"type": "string", "pattern": "^[0-9]+$"}}},
                            },
                        }
                    )
                ]
            },
            r"tools\[0\]\.function\.parameters\.properties\.when\.pattern: the JSON-schema keyword 'pattern' cannot be enforced",
        ),
        (
            {
                "tools": [
                    _strict(
                        {
                            "type": "function",
                            "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}},
                        }
                    )
                ]
            },
            r"\$ref '#/\$defs/missing' names no definition",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}},
                }
            },
            "response_format.json_schema cannot be compiled to a grammar",
        ),
    ],
    ids=["unenforceable-keyword", "dangling-ref", "json-schema-llguidance-refuses"],
)
def test_a_schema_the_grammar_cannot_enforce_fails_before_any_forward(runtime, options, match) -> None:
    steps = runtime.engine.counters.steps
    with pytest.raises(GrammarError, match=match):
        runtime.prepare(ChatRequest(messages=[{"role": "user", "content": "go"}], **options))
    assert runtime.engine.counters.steps == steps


def test_unconstrained_requests_carry_no_grammar(runtime) -> None:
    """Non-strict tools in auto mode and plain answers are decoded exactly as before: no constraint."""
    assert runtime.prepare(ChatRequest(messages=[{"role": "user", "content": "go"}], tools=held_tools())).constraint is None
    assert runtime.prepare(ChatRequest(messages=[{"role": "user", "content": "go"}])).constraint is None


# -- the memorizing model -----------------------------------------------------------------------------


def test_the_memorizing_models_tool_answers_stay_or_become_valid_when_strict() -> None:
    """Every memorized transcript that offers tools, its tools made strict. A memorized answer the
    grammar allows is written exactly (greedy constrained decoding picks the same tokens); the
    transcripts memorized with broken calls on purpose (an undeclared tool, an unterminated string)
    come out as valid calls instead. Every call validates against its schema."""
    from chat_fixtures import chat_checkpoint, transcripts

    from langchain_gemma_mtp.server import load_runtime

    runtime = load_runtime(str(chat_checkpoint()))
    unchanged = repaired = 0
    for transcript in transcripts():
        request = transcript.request()
        if not request.tools or transcript.chat_template is not None:
            continue
        free = runtime.complete(request)
        constrained = runtime.complete(replace(request, tools=[_strict(t) for t in request.tools]))
        assert not constrained["invalid_tool_calls"], constrained
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in request.tools}
        for call in constrained["tool_calls"]:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
        if free["invalid_tool_calls"]:
            repaired += bool(constrained["tool_calls"])
        else:
            calls = [[c["function"] for c in m["tool_calls"]] for m in (free, constrained)]
            assert (constrained["content"], calls[1]) == (free["content"], calls[0])
            unchanged += bool(free["tool_calls"])
    assert unchanged >= 5 and repaired >= 2, (unchanged, repaired)
