"""`gemma-mtp serve` constrains answers by grammar: response_format json_schema / json_object and
strict tools (`tools[].function.strict`), driven with the official openai client; a schema the
grammar cannot enforce is a 400 naming the schema part, and the server keeps serving.

A real server on loopback over an untrained tiny Gemma 4 with n-gram drafting (random weights:
only the grammar makes its answers valid).
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import NgramDrafter
from langchain_gemma_mtp.runtime import ChatRuntime
from langchain_gemma_mtp.server import ServerSettings, running_server
from langchain_gemma_mtp.testing import TOKENIZER_DIR, build_chat_target

NAME = "tiny-random"
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}, "tag": {"enum": ["x", "y"]}},
    "required": ["ok", "n", "tag"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "pick",
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green"]}, "count": {"type": "integer"}, "fast": {"type": "boolean"}},
            "required": ["color", "count"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client():
    runtime = ChatRuntime(Engine(build_chat_target(seed=31), NgramDrafter(), AutoTokenizer.from_pretrained(TOKENIZER_DIR), name=NAME))
    with running_server(runtime, ServerSettings(NAME, max_tokens_limit=1000)) as server:
        yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, **kwargs):
    kwargs.setdefault("max_tokens", 300)
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "go"}], **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answers_validate(client, stream) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        if stream:
            chunks = list(ask(client, response_format=response_format, temperature=1.0, seed=seed, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert chunks[-1].choices[0].finish_reason == "stop"
        else:
            reply = ask(client, response_format=response_format, temperature=1.0, seed=seed)
            content = reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(content), SCHEMA)


def test_strict_tool_calls_parse_and_validate(client) -> None:
    for seed in range(3):
        reply = ask(client, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.function.name == "pick"
        jsonschema.validate(json.loads(call.function.arguments), TOOL["function"]["parameters"])


def test_a_named_tool_choice_is_one_complete_call_within_a_tight_budget(client) -> None:
    """As vLLM, a named tool_choice is one call (no parallel_tool_calls needed); its free string is
    capped from max_tokens, so the call ends complete, in the stream too."""
    note = {
        "type": "function",
        "function": {
            "name": "note",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"],
                "additionalProperties": False,
            },
        },
    }
    choice = {"type": "function", "function": {"name": "note"}}
    for seed in range(3):
        reply = ask(client, tools=[note, TOOL], tool_choice=choice, temperature=1.0, seed=seed, max_tokens=40)
        (call,) = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "note"
        assert len(json.loads(call.function.arguments)["text"]) <= 40 // 2
    chunks = list(ask(client, tools=[note, TOOL], tool_choice=choice, temperature=1.0, seed=9, max_tokens=40, stream=True))
    pieces = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or ()]
    assert {p.index for p in pieces} == {0} and chunks[-1].choices[0].finish_reason == "tool_calls"
    json.loads("".join(p.function.arguments or "" for p in pieces))


def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_it(client) -> None:
    bad = {
        **TOOL,
        "function": {
            **TOOL["function"],
            "parameters": {"type": "object", "properties": {"when": {"type": "string", "format": "date-time"}}},
        },
    }
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, tools=[bad], tool_choice="required")
    assert caught.value.status_code == 400
    assert "tools[0].function.parameters.properties.when.format" in caught.value.message
    with pytest.raises(openai.BadRequestError, match=r"response_format\.json_schema"):
        ask(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}})
    # The server keeps serving after refusing.
    assert ask(client, response_format={"type": "json_object"}, max_tokens=5).choices[0].message.content.startswith("{")
