"""ChatRuntime: prompts (template, tools, forced calls, JSON mode, fallback template), detokenizing,
stop strings and deltas, on real tokenizers and the memorizing plumbing fixture."""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import threading

import pytest
from chat_fixtures import (
    AGENT_QUESTION,
    JAPANESE_ANSWER,
    STORY_ANSWER,
    STORY_QUESTION,
    TOKENIZER_DIR,
    TWO_CALLS_QUESTION,
    add,
    build_target,
    chat_checkpoint,
    get_weather,
    tool_options,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from transformers import AutoTokenizer

from langchain_gemma_mtp.backends import REGISTRY, engine_key
from langchain_gemma_mtp.chat_templates import FALLBACK_CHAT_TEMPLATE
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.errors import ContextLengthError, InvalidRequestError
from langchain_gemma_mtp.formats.json_calls import TOOLS_INSTRUCTION
from langchain_gemma_mtp.messages import from_langchain, normalize_messages
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime, Completion
from langchain_gemma_mtp.text_stream import IncrementalDecoder, StopMatcher

TOKENIZER = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
AGENT = tool_options([get_weather, add])


def request(messages, **options) -> ChatRequest:
    messages = [HumanMessage(messages)] if isinstance(messages, str) else messages
    return ChatRequest(messages=from_langchain(messages), **options)


def split(text_or_ids, cuts: list[int]) -> list:
    bounds = sorted({0, len(text_or_ids), *(c % (len(text_or_ids) + 1) for c in cuts)})
    return [text_or_ids[a:b] for a, b in itertools.pairwise(bounds)]


# -- detokenizing and stop strings, in any split ---------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.text().filter(lambda t: "\ufffd" not in t), st.lists(st.integers(min_value=0), max_size=8), st.text(max_size=5))
def test_incremental_decoding_never_splits_a_character(text: str, cuts: list[int], context: str) -> None:
    decoder = IncrementalDecoder(TOKENIZER, TOKENIZER.encode(context, add_special_tokens=False))
    pieces = [decoder.push(ids) for ids in split(TOKENIZER.encode(text, add_special_tokens=False), cuts)]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_byte_level_tokens_really_split_characters() -> None:
    """The property above is not vacuous: single tokens of this answer decode to half characters."""
    ids = TOKENIZER.encode(JAPANESE_ANSWER, add_special_tokens=False)
    assert any("\ufffd" in TOKENIZER.decode([i]) for i in ids)


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet="abc<|>", max_size=40),
    st.lists(st.text(alphabet="abc<|>", min_size=1, max_size=6), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0), max_size=8),
)
def test_stop_strings_truncate_exactly_before_the_first_to_complete_in_any_split(text: str, stops: list[str], cuts: list[int]) -> None:
    matcher = StopMatcher(stops)
    out = "".join(matcher.push(piece) for piece in split(text, cuts))
    if not matcher.stopped:
        out += matcher.flush()
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]  # the first to complete wins
    assert out == (text[: min(hits)[1]] if hits else text)
    assert matcher.stopped == bool(hits)


# -- prompts ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blank() -> ChatRuntime:
    """A runtime over an untrained tiny model: rendering needs no trained weights."""
    return ChatRuntime(Engine(build_target(), tokenizer=TOKENIZER, name="blank"))


def text_of(runtime: ChatRuntime, req: ChatRequest) -> str:
    return TOKENIZER.decode(runtime.prepare(req).prompt_ids)


def test_prompt_is_the_chat_template_render_with_tools_and_tool_history(blank) -> None:
    history = [
        HumanMessage("Weather?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("sunny", tool_call_id="c1"),
    ]
    req = request(history, **AGENT)
    expected = TOKENIZER.apply_chat_template(
        normalize_messages(req.messages), tools=AGENT["tools"], add_generation_prompt=True, tokenize=False
    )
    assert text_of(blank, req) == expected
    # Arguments reached the template as a dict (it refuses JSON strings) and were rendered.
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>response:get_weather' in expected


@pytest.mark.parametrize(
    "choice,opening",
    [("any", "<|tool_call>call:"), ("required", "<|tool_call>call:"), ("add", "<|tool_call>call:add{"), (True, "<|tool_call>call:")],
)
def test_forced_tool_choice_ends_the_prompt_with_the_call_opening(blank, choice, opening) -> None:
    prepared = blank.prepare(request("Hello", **tool_options([get_weather, add], choice)))
    assert prepared.forced == opening
    assert TOKENIZER.decode(prepared.prompt_ids).endswith("<|turn>model\n" + opening)
    assert prepared.draft_hint == "tool_call"


@pytest.mark.parametrize(
    "template,name,continuation",
    [
        (None, None, "add{a:1,b:2}<tool_call|>"),
        (None, "add", "a:1,b:2}<tool_call|>"),
        (FALLBACK_CHAT_TEMPLATE, None, 'add", "arguments": {"a": 1, "b": 2}}</tool_call>'),
        (FALLBACK_CHAT_TEMPLATE, "add", '{"a": 1, "b": 2}}</tool_call>'),
    ],
)
def test_a_forced_opening_and_its_continuation_parse_as_one_call(blank, template, name, continuation) -> None:
    runtime = ChatRuntime(blank.engine, chat_template=template)
    prepared = runtime.prepare(request("Add 1 and 2.", **tool_options([get_weather, add], name or "any")))
    parsed = prepared.parser.feed(prepared.forced)
    parsed.extend(prepared.parser.feed(continuation))
    parsed.extend(prepared.parser.finish())
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("add", {"a": 1, "b": 2})]


def test_tool_choice_none_declares_no_tool_and_accepts_no_call(blank) -> None:
    prepared = blank.prepare(request("Hello", **tool_options([get_weather, add], "none")))
    assert "<|tool>" not in TOKENIZER.decode(prepared.prompt_ids) and prepared.forced == ""
    parsed = prepared.parser.feed("<|tool_call>call:add{a:1,b:2}<tool_call|>")
    assert not parsed.tool_calls and "was not declared" in parsed.invalid_tool_calls[0].error


def test_runtime_rejects_a_tool_choice_naming_an_unknown_tool(blank) -> None:
    req = request("Hello", tools=AGENT["tools"], tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(InvalidRequestError, match="'nope', which is not a bound tool"):
        blank.prepare(req)


def test_json_modes_open_the_answer_with_a_brace(blank) -> None:
    prepared = blank.prepare(request("Joke?", response_format={"type": "json_object"}))
    text = TOKENIZER.decode(prepared.prompt_ids)
    assert prepared.forced == "{" and text.endswith("<|turn>model\n{")
    assert text.startswith("<bos><|turn>system\nAnswer with a single JSON object and nothing else.<turn|>")
    schema = {"type": "object", "properties": {"setup": {"type": "string"}}}
    text = text_of(blank, request("Joke?", response_format={"type": "json_schema", "json_schema": {"name": "J", "schema": schema}}))
    assert json.dumps(schema) in text
    with pytest.raises(InvalidRequestError, match="unsupported response_format type 'xml'"):
        blank.prepare(request("Joke?", response_format={"type": "xml"}))


def test_reasoning_switches_thinking_on(blank) -> None:
    text = text_of(blank, request("Hi", reasoning=True))
    assert text == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_prompt_longer_than_the_context_names_both_numbers(blank) -> None:
    long = "The quick brown fox jumps over the lazy dog. " * 150
    tokens = len(blank.prompts.encode(normalize_messages([{"role": "user", "content": long}]), None, False))
    assert tokens > 1024
    assert len(blank.prepare(request(long)).prompt_ids) == tokens  # counted (trim_messages), not run
    with pytest.raises(ContextLengthError, match=f"the prompt is {tokens} tokens but blank has a context of 1024 tokens"):
        next(blank.stream(request(long)))


def test_max_tokens_is_cut_to_the_room_left_in_the_context(blank) -> None:
    prepared = blank.prepare(request("The quick brown fox jumps over the lazy dog. " * 100, max_tokens=512))
    assert blank._room(len(prepared.prompt_ids), 512) == 1024 - len(prepared.prompt_ids) < 512


def test_fallback_template_and_json_tool_convention(blank) -> None:
    no_template = copy.deepcopy(TOKENIZER)
    no_template.chat_template = None
    runtime = ChatRuntime(blank.engine, tokenizer=no_template)
    assert runtime.chat_template == FALLBACK_CHAT_TEMPLATE and not runtime.native_tools
    history = [
        HumanMessage("Weather?"),
        AIMessage("Checking.", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1", "type": "tool_call"}]),
        ToolMessage("sunny", tool_call_id="c1"),
    ]
    text = text_of(runtime, request(history, **AGENT))
    instruction = text[len("<bos><start_of_turn>user\n") : text.index("\n\nWeather?")]
    assert instruction.startswith("You can call tools. The tools, as JSON:\n")
    assert instruction.endswith(TOOLS_INSTRUCTION.split("{tools}\n")[1].format())
    assert text.endswith(
        "Weather?<end_of_turn>\n"
        '<start_of_turn>model\nChecking.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call><end_of_turn>\n'
        '<start_of_turn>user\n<tool_response>{"name": "get_weather", "content": "sunny"}</tool_response><end_of_turn>\n'
        "<start_of_turn>model\n"
    )
    forced = runtime.prepare(request("Weather?", **tool_options([get_weather, add], "add")))
    assert forced.forced == '<tool_call>{"name": "add", "arguments": '


# -- generation on the memorizing fixture -----------------------------------------------------------


@pytest.fixture(scope="module")
def runtime() -> ChatRuntime:
    engine = REGISTRY.engine(engine_key(str(chat_checkpoint()), "auto", None, None, None))
    return REGISTRY.runtime(engine)


def merged(deltas: list[dict]) -> dict:
    completion = Completion()
    for delta in deltas:
        completion.add(delta)
    return completion.message


def run(runtime: ChatRuntime, req: ChatRequest) -> tuple[list[dict], dict]:
    deltas = list(runtime.stream(req))
    return deltas, merged(deltas)


def without_stats(message: dict) -> dict:
    return {k: v for k, v in message.items() if k not in ("speculative", "usage")}


def test_deltas_of_a_plain_answer(runtime) -> None:
    req = request("Hello")
    deltas, message = run(runtime, req)
    assert message["content"] == "Hello! How can I help you today?"  # the <turn|> end marker is stripped
    assert all(set(d) <= {"content", "burst_sizes"} for d in deltas[:-1]) and len(deltas) > 2
    last = deltas[-1]
    assert last["finish_reason"] == "stop"
    prompt_tokens = len(runtime.prepare(req).prompt_ids)
    completion_tokens = len(TOKENIZER.encode("Hello! How can I help you today?<turn|>", add_special_tokens=False))
    cached = last["usage"]["prompt_tokens_details"]["cached_tokens"]  # earlier tests may share a prefix
    assert last["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    bursts = [n for d in deltas for n in d.get("burst_sizes", [])]
    assert sum(bursts) == completion_tokens and len(bursts) == last["speculative"]["target_forwards"]
    spec = last["speculative"]
    assert spec["drafter"] == "hybrid" and spec["draft_hint"] == "prose" and spec["num_draft_tokens"] is None
    assert spec["accepted"] <= spec["drafted"] and spec["target_forwards"] >= 1 and spec["tokens_per_second"] > 0
    assert spec["mean_accepted_length"] == pytest.approx((spec["accepted"] + spec["target_forwards"] - 1) / (spec["target_forwards"] - 1))
    whole = runtime.complete(req)  # the same answer in one message (the adaptive draft lengths may differ)
    # The first call left its prompt in the prefix cache: all but the last prompt token is reused.
    assert whole["usage"]["prompt_tokens_details"] == {"cached_tokens": prompt_tokens - 1}
    assert without_stats(whole) == without_stats(message) and whole["usage"]["total_tokens"] == last["usage"]["total_tokens"]


def story_bursts(runtime: ChatRuntime, draft: int) -> list[tuple[str, str]]:
    """Each verified burst of the story answer as (its text, its text without its last token)."""
    prepared = runtime.prepare(request(STORY_QUESTION))
    handle = runtime.engine.submit(prepared.prompt_ids, max_new_tokens=400, num_draft_tokens=draft, stop_token_ids=runtime.stop_token_ids)
    ids: list[int] = []
    bursts = []
    for burst in handle:
        before = TOKENIZER.decode(ids)
        new = [t for t in burst.token_ids if t not in runtime.stop_token_ids]
        head = TOKENIZER.decode(ids + new[:-1])[len(before) :]
        ids += new
        bursts.append((TOKENIZER.decode(ids)[len(before) :], head))
    assert "".join(text for text, _ in bursts) == STORY_ANSWER
    return bursts


def test_a_stop_string_completing_inside_an_accepted_burst_truncates_exactly_before_it(runtime) -> None:
    # Find a stop string that starts inside one burst and ends before that burst's last token, first
    # occurring there: the engine verified tokens past it in the same step, and they must not leak.
    offset, found = 0, None
    for text, head in story_bursts(runtime, draft=6):
        found = next((i for i in range(1, len(head) - 2) if STORY_ANSWER.find(head[i : i + 3]) == offset + i), None)
        if found is not None:
            stop, cut = head[found : found + 3], offset + found
            break
        offset += len(text)
    assert found is not None, "no burst of several tokens: the distilled drafter is not accepting drafts"
    _, message = run(runtime, request(STORY_QUESTION, stop=[stop], num_draft_tokens=6))
    assert message["content"] == STORY_ANSWER[:cut]
    assert message["finish_reason"] == "stop"


@pytest.mark.parametrize("start,length", [(40, 1), (30, 90), (0, 200)])
def test_stop_strings_of_any_length_spanning_bursts(runtime, start, length) -> None:
    stop = STORY_ANSWER[start : start + length]
    _, message = run(runtime, request(STORY_QUESTION, stop=["never appears", stop], num_draft_tokens=4))
    assert message["content"] == STORY_ANSWER[: STORY_ANSWER.index(stop)]
    assert message["finish_reason"] == "stop"
    assert message["usage"]["completion_tokens"] < len(TOKENIZER.encode(STORY_ANSWER))  # generation stopped early


def test_a_stop_string_prefix_that_never_completes_is_released(runtime) -> None:
    _, message = run(runtime, request("Hello", stop=["Hello? No"]))
    assert message["content"] == "Hello! How can I help you today?"


def test_max_tokens_ends_with_length(runtime) -> None:
    _, message = run(runtime, request(STORY_QUESTION, max_tokens=5))
    assert message["finish_reason"] == "length" and message["usage"]["completion_tokens"] == 5
    assert message["content"] == TOKENIZER.decode(TOKENIZER.encode(STORY_ANSWER)[:5])


def test_multibyte_characters_arrive_whole_with_one_token_per_burst(runtime) -> None:
    deltas, message = run(runtime, request("Say hello in Japanese.", num_draft_tokens=0))
    assert message["content"] == JAPANESE_ANSWER
    assert not any("\ufffd" in d.get("content", "") for d in deltas)


def test_tool_calls_stream_as_openai_pieces(runtime) -> None:
    deltas, message = run(runtime, request(AGENT_QUESTION, **AGENT))
    [piece] = [d for d in deltas if "tool_calls" in d]
    [call] = piece["tool_calls"]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert message["content"] == "" and message["finish_reason"] == "tool_calls"


def test_parallel_tool_calls_false_stops_after_the_first_call(runtime) -> None:
    _, both = run(runtime, request(TWO_CALLS_QUESTION, **AGENT))
    assert [json.loads(c["function"]["arguments"]) for c in both["tool_calls"]] == [{"city": "Paris"}, {"city": "Rome"}]
    _, one = run(runtime, request(TWO_CALLS_QUESTION, parallel_tool_calls=False, **AGENT))
    assert [json.loads(c["function"]["arguments"]) for c in one["tool_calls"]] == [{"city": "Paris"}]
    assert one["invalid_tool_calls"] == [] and one["finish_reason"] == "tool_calls"  # the second call is dropped whole
    assert one["usage"]["completion_tokens"] < both["usage"]["completion_tokens"]


def test_invalid_calls_keep_their_raw_text_and_reason(runtime) -> None:
    _, message = run(runtime, request("Launch the rockets.", **AGENT))
    assert message["content"] == "Launching." and message["tool_calls"] == []
    [bad] = message["invalid_tool_calls"]
    assert bad["raw"] == "<|tool_call>call:launch_rockets{now:true}<tool_call|>"
    assert bad["name"] == "launch_rockets" and bad["error"] == "tool 'launch_rockets' was not declared (declared: add, get_weather)"


def test_a_stop_string_inside_a_tool_call_leaves_an_invalid_call_with_the_text(runtime) -> None:
    _, message = run(runtime, request(AGENT_QUESTION, stop=["Paris"], **AGENT))
    [bad] = message["invalid_tool_calls"]
    assert bad["raw"] == '<|tool_call>call:get_weather{city:<|"|>' and bad["error"] == "tool call not closed with <tool_call|>"
    assert message["tool_calls"] == [] and message["finish_reason"] == "tool_calls"


def test_json_tool_convention_end_to_end_on_the_fallback_template(runtime) -> None:
    fallback = ChatRuntime(runtime.engine, chat_template=FALLBACK_CHAT_TEMPLATE)
    _, message = run(fallback, request(AGENT_QUESTION, **AGENT))
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    history = [
        HumanMessage(AGENT_QUESTION),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_0", "type": "tool_call"}]),
        ToolMessage("sunny, 21C", tool_call_id="call_0", name="get_weather"),
    ]
    _, message = run(fallback, request(history, **AGENT))
    assert message["content"] == "It is sunny in Paris." and message["finish_reason"] == "stop"


def test_astream_prepares_off_the_event_loop(runtime, monkeypatch) -> None:
    """The prompt (template, tokenization, a grammar: the first for a tokenizer takes seconds) is
    prepared on a worker thread, so a server's other streams keep moving meanwhile."""
    threads = []
    prepare = runtime.prepare

    def spy(req):
        threads.append(threading.current_thread())
        return prepare(req)

    monkeypatch.setattr(runtime, "prepare", spy)

    async def collect() -> tuple[threading.Thread, list[dict]]:
        return threading.current_thread(), [d async for d in runtime.astream(request("Hey"))]

    loop_thread, deltas = asyncio.run(collect())
    assert deltas and len(threads) == 1 and threads[0] is not loop_thread


def test_astream_gives_the_same_deltas(runtime) -> None:
    async def collect() -> list[dict]:
        return [d async for d in runtime.astream(request("Hey"))]

    deltas = asyncio.run(collect())
    sync = list(runtime.stream(request("Hey")))
    # Timings differ; the second call reuses the first one's prompt from the prefix cache and
    # copies its answer from the cross-call index, so its bursts (chunking) differ too.
    assert without_stats(merged(deltas)) == without_stats(merged(sync))
    assert deltas[-1]["usage"]["total_tokens"] == sync[-1]["usage"]["total_tokens"]
    assert "".join(d.get("content", "") for d in deltas) == "Hey there! What can I do for you?"
