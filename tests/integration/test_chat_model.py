"""ChatGemmaMTP's LangChain surface on the memorizing plumbing fixture: registry, streaming chunks,
usage and metadata, stop strings, tool calls (valid and invalid), reasoning, structured output,
per-call draft hints, and bad input.

The model only knows the transcripts of `chat_fixtures.py`; these tests check the plumbing around
it, and that drafting choices never change a greedy answer (the engine is lossless).
"""

from __future__ import annotations

import pytest
from chat_fixtures import (
    AGENT_QUESTION,
    CODE_ANSWER,
    CODE_QUESTION,
    JOKE_QUESTION,
    STORY_ANSWER,
    STORY_QUESTION,
    THINKING_ANSWER,
    THINKING_QUESTION,
    THOUGHT,
    TokenCounter,
    add,
    chat_checkpoint,
    get_weather,
)
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage
from pydantic import BaseModel

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.backends import REGISTRY, engine_key
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.errors import ContextLengthError, InvalidRequestError, UnsupportedContentError

HELLO_ANSWER = "Hello! How can I help you today?"
SPECULATIVE_KEYS = {
    "verify_widths",
    "step_costs",
    "drafter",
    "draft_hint",
    "num_draft_tokens",
    "drafted",
    "sibling_tokens",
    "jump_forward_tokens",
    "jump_forward_accepted",
    "accepted",
    "acceptance_rate",
    "mean_accepted_length",
    "per_position_acceptance",
    "draft_lengths",
    "target_forwards",
    "tokens_per_second",
}


@pytest.fixture(scope="module")
def path() -> str:
    return str(chat_checkpoint())


@pytest.fixture(scope="module")
def llm(path) -> ChatGemmaMTP:
    return ChatGemmaMTP(model=path)


def streamed(chunks) -> tuple[list[AIMessageChunk], AIMessageChunk]:
    chunks = list(chunks)
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return chunks, total


# -- construction and the engine registry -----------------------------------------------------------


def test_construction_loads_nothing_and_equal_settings_share_one_engine(path) -> None:
    key = engine_key(path, "ngram", None, None, None)
    first = ChatGemmaMTP(model=path, drafter="ngram")
    assert key not in REGISTRY.loaded()
    assert first.invoke("Hello").content == HELLO_ANSWER
    assert REGISTRY.loaded().count(key) == 1
    second = ChatGemmaMTP(model_name=path, drafter="ngram", temperature=0.0)  # `model_name` is an alias
    assert second.invoke("Hey").response_metadata["speculative"]["drafter"] == "ngram"
    assert second._backend_for_calls().runtime.engine is first._backend_for_calls().runtime.engine
    assert ChatGemmaMTP(model=path)._backend_for_calls().runtime.engine is not first._backend_for_calls().runtime.engine


def test_mtp_stop_below_loads_its_own_engine(path) -> None:
    llm = ChatGemmaMTP(model=path, drafter="mtp", mtp_stop_below=0.0)
    engine = llm._backend_for_calls().runtime.engine
    assert engine.drafter.stop_below == 0.0
    assert engine is REGISTRY.engine(engine_key(path, "mtp", None, None, None, 0.0))
    default = ChatGemmaMTP(model=path, drafter="mtp")._backend_for_calls().runtime.engine
    assert default.drafter.stop_below is None and default is not engine  # the schedule picks it per step
    assert ChatGemmaMTP(model=path, drafter="mtp", mtp_stop_below=0.3)._backend_for_calls().runtime.engine is not default
    assert llm._identifying_params["mtp_stop_below"] == 0.0
    assert llm.invoke("Hello").content == HELLO_ANSWER  # drafting settings never change a greedy answer


def test_mtp_siblings_load_their_own_engine(path) -> None:
    llm = ChatGemmaMTP(model=path, drafter="mtp", mtp_siblings=0)
    engine = llm._backend_for_calls().runtime.engine
    assert engine.drafter.siblings_per_depth == 0
    assert engine is REGISTRY.engine(engine_key(path, "mtp", None, None, None, None, 0))
    default = ChatGemmaMTP(model=path, drafter="mtp")._backend_for_calls().runtime.engine
    assert default.drafter.siblings_per_depth is None and default is not engine  # the schedule picks it per step
    assert ChatGemmaMTP(model=path, drafter="mtp", mtp_siblings=3)._backend_for_calls().runtime.engine is not default
    assert llm._identifying_params["mtp_siblings"] == 0
    assert llm.invoke("Hello").content == HELLO_ANSWER


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mtp_stop_below": 1.5}, r"stop_below must be a number in \[0, 1\)"),
        ({"mtp_stop_below": 0.2, "base_url": "http://127.0.0.1:1/v1"}, "a server sets its own"),
        ({"mtp_siblings": 9}, r"siblings must be an int in \[0, 8\]"),
        ({"mtp_siblings": 1, "base_url": "http://127.0.0.1:1/v1"}, "mtp_siblings applies when this class loads"),
    ],
)
def test_bad_mtp_stop_below_is_refused_at_construction(path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        ChatGemmaMTP(model=path, **kwargs)


def test_a_ready_engine_can_be_passed(path) -> None:
    engine = Engine.from_pretrained(path, drafter="none")
    llm = ChatGemmaMTP(engine=engine)
    assert llm.model == engine.name == path
    message = llm.invoke("Hello")
    assert message.content == HELLO_ANSWER and message.response_metadata["speculative"]["drafter"] == "none"
    with pytest.raises(ValueError, match="a ready engine= its drafter's"):  # the engine's drafter owns it
        ChatGemmaMTP(engine=engine, mtp_stop_below=0.2)
    with pytest.raises(ValueError, match="a ready engine= its drafter's"):
        ChatGemmaMTP(engine=engine, mtp_siblings=1)


# -- chunks, usage, metadata ------------------------------------------------------------------------


def test_stream_yields_a_chunk_per_burst_with_usage_and_metadata_on_the_last_only(llm) -> None:
    chunks, total = streamed(llm.stream(STORY_QUESTION))
    assert total.content == STORY_ANSWER
    assert len(chunks) > 5
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert all(not c.usage_metadata and not c.response_metadata for c in chunks[:-1])
    usage = last.usage_metadata
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert 0 <= usage["input_token_details"]["cache_read"] < usage["input_tokens"]
    metadata = last.response_metadata
    assert metadata["model_name"] == llm.model and metadata["model_provider"] == "gemma_mtp"
    assert metadata["finish_reason"] == "stop"
    assert set(metadata["speculative"]) == SPECULATIVE_KEYS
    # More tokens than target forwards: the drafter's tokens were accepted in bursts.
    assert usage["output_tokens"] > metadata["speculative"]["target_forwards"]


def test_repeated_history_is_read_from_the_prefix_cache(llm) -> None:
    """An agent step resends the conversation so far: only what is new is prefilled."""
    first = llm.invoke([HumanMessage(STORY_QUESTION)])
    again = llm.invoke([HumanMessage(STORY_QUESTION)])
    usage = again.usage_metadata
    assert again.content == first.content == STORY_ANSWER
    assert usage["input_token_details"]["cache_read"] == usage["input_tokens"] - 1
    # The template opens a reply with an empty thought channel (6 tokens) that a finished reply in
    # the history does not have, so the next turn reuses the history up to that reply's turn...
    history = [HumanMessage(STORY_QUESTION), first, HumanMessage("Hello")]
    follow_up = llm.invoke(history, max_tokens=4)
    assert follow_up.usage_metadata["input_token_details"]["cache_read"] >= usage["input_tokens"] - 6
    # ...and the turn after it reuses everything the follow-up's prompt held.
    third = llm.invoke([*history, follow_up, HumanMessage("Hey")], max_tokens=4)
    assert third.usage_metadata["input_token_details"]["cache_read"] >= follow_up.usage_metadata["input_tokens"] - 6


def test_each_chunk_lists_the_bursts_verified_for_it(llm) -> None:
    chunks, total = streamed(llm.stream(STORY_QUESTION))
    assert all(c.additional_kwargs["burst_sizes"] for c in chunks[:-1])  # every chunk but the last has its own
    sizes = total.additional_kwargs["burst_sizes"]  # merged chunks list every burst, in order
    assert sizes == [n for c in chunks for n in c.additional_kwargs.get("burst_sizes", [])]
    assert sum(sizes) == total.usage_metadata["output_tokens"]
    assert len(sizes) == total.response_metadata["speculative"]["target_forwards"]  # one burst per forward
    assert max(sizes) > 1  # multi-token bursts: drafts were accepted


def test_callbacks_see_every_chunk_when_invoke_streams(llm, path) -> None:
    plain, streaming = TokenCounter(), TokenCounter()
    assert llm.invoke(STORY_QUESTION, config={"callbacks": [plain]}).content == STORY_ANSWER
    # A fixed draft length makes the bursts, hence the chunks, the same on both paths.
    chunks = list(llm.stream(STORY_QUESTION, num_draft_tokens=4))
    message = ChatGemmaMTP(model=path, streaming=True, num_draft_tokens=4).invoke(STORY_QUESTION, config={"callbacks": [streaming]})
    assert message.content == STORY_ANSWER and message.usage_metadata["output_tokens"] > 0
    assert plain.chunks == [] and len(streaming.chunks) == len(chunks) > 5
    assert "".join(c.message.content for c in streaming.chunks) == STORY_ANSWER


def test_invoke_matches_the_stream(llm) -> None:
    message = llm.invoke(STORY_QUESTION)
    _, total = streamed(llm.stream(STORY_QUESTION))
    assert isinstance(message, AIMessage) and message.content == total.content
    assert message.usage_metadata == total.usage_metadata


async def test_async_invoke_and_stream(llm) -> None:
    message = await llm.ainvoke("Hey")
    chunks = [c async for c in llm.astream("Hey")]
    assert message.content == "".join(c.content for c in chunks) == "Hey there! What can I do for you?"
    assert chunks[-1].usage_metadata["output_tokens"] == message.usage_metadata["output_tokens"]


def test_batch_from_threads_returns_each_answer(llm) -> None:
    results = llm.batch(["Hello", CODE_QUESTION, STORY_QUESTION])
    assert [r.content for r in results] == [HELLO_ANSWER, CODE_ANSWER, STORY_ANSWER]


async def test_abatch_returns_each_answer(llm) -> None:
    results = await llm.abatch(["Hello", CODE_QUESTION, STORY_QUESTION])
    assert [r.content for r in results] == [HELLO_ANSWER, CODE_ANSWER, STORY_ANSWER]


def test_seeded_sampling_reproduces_its_answer(llm) -> None:
    options = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 11}
    first, second = llm.invoke(STORY_QUESTION, **options), llm.invoke(STORY_QUESTION, **options)
    assert first.content == second.content and first.content


# -- stop strings -----------------------------------------------------------------------------------


def test_stop_strings_cut_the_answer_exactly_before_them(llm, path) -> None:
    message = llm.invoke("hi", stop=["you"])
    assert message.content == "Hi! How are " and message.response_metadata["finish_reason"] == "stop"
    _, total = streamed(llm.stream("hi", stop=["you"]))
    assert total.content == "Hi! How are "
    with_stop = ChatGemmaMTP(model=path, stop=["How"])
    assert with_stop.invoke("hi").content == "Hi! "
    assert with_stop.invoke("hi", stop=["are"]).content == "Hi! How "  # a call's stop replaces the instance's


# -- tool calls -------------------------------------------------------------------------------------


def test_tool_calls_stream_as_chunks_and_end_as_tool_calls(llm) -> None:
    bound = llm.bind_tools([get_weather, add])
    chunks, total = streamed(bound.stream(AGENT_QUESTION))
    assert any(c.tool_call_chunks and c.tool_call_chunks[0]["name"] == "get_weather" for c in chunks)
    [call] = total.tool_calls
    assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"} and call["id"].startswith("call_")
    assert total.response_metadata["finish_reason"] == "tool_calls"
    message = bound.invoke(AGENT_QUESTION)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_tool_choice_none_is_enforced(llm) -> None:
    message = llm.bind_tools([get_weather, add], tool_choice="none").invoke(AGENT_QUESTION)
    assert message.tool_calls == []


@pytest.mark.parametrize(
    "question,name,raw,error",
    [
        (
            "Launch the rockets.",
            "launch_rockets",
            "<|tool_call>call:launch_rockets{now:true}<tool_call|>",
            "tool 'launch_rockets' was not declared (declared: add, get_weather)",
        ),
        (
            "What is the weather in Rome?",
            "get_weather",
            '<|tool_call>call:get_weather{city:<|"|>Rome}<tool_call|>',
            "arguments do not parse: unterminated string",
        ),
    ],
)
def test_bad_calls_become_invalid_tool_calls_with_raw_text_and_reason(llm, question, name, raw, error) -> None:
    bound = llm.bind_tools([get_weather, add])
    message = bound.invoke(question)
    [bad] = message.invalid_tool_calls
    assert message.tool_calls == [] and bad["name"] == name and bad["args"] == raw and bad["error"].startswith(error)
    _, total = streamed(bound.stream(question))
    [streamed_bad] = total.invalid_tool_calls
    assert streamed_bad["args"] == raw and total.tool_calls == []
    assert total.response_metadata["invalid_tool_call_errors"][streamed_bad["id"]].startswith(error)


# -- reasoning and structured output ----------------------------------------------------------------


def test_reasoning_is_standard_reasoning_content(llm, path) -> None:
    message = llm.invoke(THINKING_QUESTION, reasoning=True)
    assert message.content == THINKING_ANSWER
    assert message.additional_kwargs["reasoning_content"] == THOUGHT
    assert message.content_blocks[0] == {"type": "reasoning", "reasoning": THOUGHT}
    chunks, total = streamed(ChatGemmaMTP(model=path, reasoning=True).stream(THINKING_QUESTION))
    assert total.content == THINKING_ANSWER and total.additional_kwargs["reasoning_content"] == THOUGHT
    assert any(c.additional_kwargs.get("reasoning_content") for c in chunks)


class Joke(BaseModel):
    """Joke to tell user."""

    setup: str
    punchline: str


def test_json_schema_structured_output_with_raw(llm) -> None:
    result = llm.with_structured_output(Joke, method="json_schema", include_raw=True).invoke(JOKE_QUESTION)
    assert result["parsing_error"] is None and isinstance(result["raw"], AIMessage)
    assert result["parsed"] == Joke(setup="Why did the cat sit on the computer?", punchline="To keep an eye on the mouse.")
    assert result["raw"].content.startswith('{"setup": ')  # the forced opening brace is part of the answer


def test_structured_output_method_is_checked(llm) -> None:
    with pytest.raises(ValueError, match="unknown method 'xml'"):
        llm.with_structured_output(Joke, method="xml")


# -- draft hints ------------------------------------------------------------------------------------


def hint_of(message: AIMessage) -> str | int:
    return message.response_metadata["speculative"]["draft_hint"]


def test_auto_hint_follows_the_request(llm) -> None:
    assert hint_of(llm.invoke("Hello")) == "prose"
    assert hint_of(llm.invoke(CODE_QUESTION)) == "code"
    assert hint_of(llm.invoke(STORY_QUESTION)) == "long_form"
    assert hint_of(llm.bind_tools([get_weather, add]).invoke(AGENT_QUESTION)) == "tool_call"


def test_hints_reach_the_engine_per_call_and_never_change_the_answer(llm, path) -> None:
    by_kwarg = llm.invoke(CODE_QUESTION, draft_hint="long_form")
    by_bind = llm.bind(draft_hint=2).invoke(CODE_QUESTION)
    by_config = llm.invoke(CODE_QUESTION, config={"configurable": {"draft_hint": "tool_call"}})
    kwarg_beats_config = llm.invoke(CODE_QUESTION, draft_hint=0, config={"configurable": {"draft_hint": "tool_call"}})
    by_instance = ChatGemmaMTP(model=path, draft_hint="long_form").invoke(CODE_QUESTION)
    assert [hint_of(m) for m in (by_kwarg, by_bind, by_config, kwarg_beats_config, by_instance)] == [
        "long_form",
        2,
        "tool_call",
        0,
        "long_form",
    ]
    assert kwarg_beats_config.response_metadata["speculative"]["drafted"] == 0
    fixed = llm.invoke(CODE_QUESTION, num_draft_tokens=3).response_metadata["speculative"]
    assert fixed["num_draft_tokens"] == 3 and fixed["drafted"] <= 3 * fixed["target_forwards"]
    assert {m.content for m in (by_kwarg, by_bind, by_config, kwarg_beats_config, by_instance)} == {CODE_ANSWER}
    by_tools = llm.bind_tools([get_weather, add], draft_hint="prose").invoke(AGENT_QUESTION)
    assert hint_of(by_tools) == "prose" and by_tools.tool_calls[0]["args"] == {"city": "Paris"}


# -- bad input --------------------------------------------------------------------------------------


def test_image_content_raises_naming_the_text_only_limitation(llm) -> None:
    image = HumanMessage([{"type": "text", "text": "Describe:"}, {"type": "image", "base64": "AAAA", "mime_type": "image/png"}])
    with pytest.raises(UnsupportedContentError, match="text-only"):
        llm.invoke([image])


def test_empty_message_list_raises_value_error(llm) -> None:
    with pytest.raises(ValueError, match="messages is empty"):
        llm.invoke([])


def test_a_prompt_longer_than_the_context_names_both_numbers(llm) -> None:
    with pytest.raises(ContextLengthError, match=r"the prompt is \d{4} tokens but .* has a context of 1024 tokens"):
        llm.invoke("The quick brown fox jumps over the lazy dog. " * 150)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"frobnicate": True}, r"unknown option\(s\) \['frobnicate'\]"),
        ({"model": "other-model"}, "cannot switch to 'other-model' per call"),
        ({"draft_hint": "poetry"}, "unknown draft_hint 'poetry'"),
        ({"num_draft_tokens": 40}, "num_draft_tokens must be an int in"),
        ({"max_tokens": 0}, "max_tokens must be a positive int"),
    ],
)
def test_bad_call_options_raise_clear_errors(llm, kwargs, message) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        llm.invoke("Hello", **kwargs)
