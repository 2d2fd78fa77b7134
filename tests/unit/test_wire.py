"""The OpenAI wire format both ends of HTTP share: requests and deltas survive the round trip, the
HTTP backend reads server-sent events as the runtime's deltas, and errors map to statuses and back."""

from __future__ import annotations

import json

import pytest

from langchain_gemma_mtp.engine.types import Burst, EngineCounters
from langchain_gemma_mtp.errors import (
    HTTP_ERRORS,
    AuthenticationError,
    ContextLengthError,
    InvalidRequestError,
    KVCacheLimitError,
    ModelNotFoundError,
    ServerBusyError,
    ServerError,
    error_for_status,
    http_error,
)
from langchain_gemma_mtp.http_backend import _completion, _error_from_body, _StreamReader
from langchain_gemma_mtp.runtime import ChatRequest
from langchain_gemma_mtp.wire import ChatCompletionBody, request_body, runtime_delta, wire_delta

TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}

DELTAS = [
    {"content": "Hello, 世界"},
    {"reasoning": "thinking..."},
    {"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": '}}]},
    {"tool_calls": [{"index": 0, "id": None, "type": "function", "function": {"name": None, "arguments": '"Paris"}'}}]},
    {
        "content": "Launching.",
        "tool_calls": [{"index": 0, "id": "call_2", "type": "function", "function": {"name": "add", "arguments": "{}"}}],
        "invalid_tool_calls": [
            {"index": 1, "id": "call_3", "name": "launch_rockets", "raw": "call:launch_rockets{now:true}", "error": "not a declared tool"}
        ],
    },
]


@pytest.mark.parametrize("delta", DELTAS)
def test_runtime_deltas_survive_the_wire(delta) -> None:
    wire = json.loads(json.dumps(wire_delta(delta)))
    assert runtime_delta(wire) == delta


def test_an_invalid_call_goes_out_as_a_tool_call_with_raw_arguments_and_its_reason() -> None:
    (call,) = wire_delta({"invalid_tool_calls": [DELTAS[4]["invalid_tool_calls"][0]]})["tool_calls"]
    assert call["function"] == {"name": "launch_rockets", "arguments": "call:launch_rockets{now:true}"}
    assert call["error"] == "not a declared tool"


def test_a_request_survives_the_wire() -> None:
    request = ChatRequest(
        messages=[{"role": "user", "content": "hi"}],
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        response_format={"type": "json_object"},
        reasoning=True,
        max_tokens=77,
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop=["END"],
        draft_hint="code",
        num_draft_tokens=3,
    )
    body = json.loads(json.dumps(request_body(request, "m", stream=True)))
    assert body["stream_options"] == {"include_usage": True}
    assert ChatCompletionBody.model_validate(body).to_request(default_max_tokens=1) == request


def test_tool_call_arguments_go_out_as_json_text_as_openai_servers_expect() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
    history = [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    (_, sent) = request_body(ChatRequest(messages=history), "m", stream=False)["messages"]
    assert json.loads(sent["tool_calls"][0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert call["function"]["arguments"] == {"a": 2, "b": 3}  # the caller's messages are not changed


def test_defaults_send_only_standard_fields() -> None:
    body = request_body(ChatRequest(messages=[{"role": "user", "content": "hi"}]), "m", stream=False)
    assert set(body) == {"model", "messages", "max_tokens", "temperature", "stream"}
    parsed = ChatCompletionBody.model_validate({"model": "m", "messages": body["messages"]}).to_request(default_max_tokens=64)
    assert parsed.max_tokens == 64 and parsed.temperature == 1.0 and parsed.draft_hint == "auto"  # OpenAI's defaults


def _events(*chunks: dict | str) -> list[str]:
    lines = []
    for chunk in chunks:
        lines += [f"data: {chunk if isinstance(chunk, str) else json.dumps(chunk)}", ""]
    return lines


def _chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}


def test_the_stream_reader_yields_runtime_deltas_and_holds_the_final_one_for_usage() -> None:
    # As vLLM streams: a role chunk, text, a tool call in pieces, the finish chunk, then usage alone.
    lines = _events(
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hi"}),
        _chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
        _chunk({}, "tool_calls", speculative_decoding_stats={"drafted": 4, "accepted": 3}),
        {"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}},
        "[DONE]",
    )
    reader = _StreamReader()
    deltas = [d for d in (reader.feed_line(line) for line in [": keep-alive", *lines]) if d]
    assert deltas == [
        {"content": "Hi"},
        {"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "id": None, "type": "function", "function": {"name": None, "arguments": "{}"}}]},
    ]
    assert reader.finish() == {
        "finish_reason": "tool_calls",
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 0}},
        "speculative": {"drafted": 4, "accepted": 3},
    }


def test_a_stream_that_breaks_off_or_reports_an_error_raises_typed_errors() -> None:
    reader = _StreamReader()
    for line in _events(_chunk({"content": "Hi"})):
        reader.feed_line(line)
    with pytest.raises(ServerError, match="without a finish_reason"):
        reader.finish()
    failing = _StreamReader()
    failing.feed_line('data: {"error": {"message": "boom", "type": "server_error", "param": null, "code": null}}')
    with pytest.raises(ServerError, match="boom"):
        failing.feed_line("")


def test_a_whole_completion_reads_as_the_runtimes_message() -> None:
    body = {
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi", "reasoning_content": "hm"}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    }
    message = _completion(body)
    assert (message["content"], message["reasoning"], message["tool_calls"], message["finish_reason"]) == ("Hi", "hm", [], "stop")
    assert message["speculative"] == {}  # a server without our extension


@pytest.mark.parametrize(("cls", "status", "kind", "code"), HTTP_ERRORS, ids=[row[0].__name__ for row in HTTP_ERRORS])
def test_each_error_maps_to_its_status_and_back(cls, status, kind, code) -> None:
    assert http_error(cls("m")) == (status, kind, code)
    assert type(error_for_status(status, "m", code)) is cls


def test_statuses_without_a_code_map_to_the_general_class() -> None:
    assert type(error_for_status(400, "m")) is InvalidRequestError  # not ContextLengthError
    assert type(error_for_status(400, "m", "context_length_exceeded")) is ContextLengthError
    assert type(error_for_status(401, "m")) is AuthenticationError
    assert type(error_for_status(422, "m")) is InvalidRequestError
    assert type(error_for_status(502, "m")) is ServerError
    assert type(error_for_status(429, "m")) is ServerBusyError and type(error_for_status(408, "m")) is ServerError
    assert type(error_for_status(400, "m", "kv_cache_limit_exceeded")) is KVCacheLimitError
    assert http_error(KeyError("bug")) == (500, "server_error", None)


def test_engine_counters_count_drafts_per_position() -> None:
    counters = EngineCounters()
    for burst in (Burst([1], 0, 0), Burst([1, 2, 3], 3, 2), Burst([4], 1, 0)):
        counters.add(burst)
    assert (counters.steps, counters.drafts, counters.draft_tokens, counters.accepted_tokens, counters.generated_tokens) == (3, 2, 4, 2, 5)
    assert counters.drafted_at == [2, 1, 1] and counters.accepted_at == [1, 1, 0]


def test_error_bodies_of_other_servers_are_read_too() -> None:
    vllm = {"object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError", "param": None, "code": 404}
    error = _error_from_body(404, vllm)
    assert type(error) is ModelNotFoundError and "does not exist" in str(error)
    assert type(_error_from_body(502, "Bad Gateway")) is ServerError
