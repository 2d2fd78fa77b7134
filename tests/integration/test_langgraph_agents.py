"""ChatGemmaMTP inside real LangGraph: a create_agent loop with two tools streamed through
stream_mode="messages", draft hints from agent middleware and from the graph's config, three
parallel nodes sharing one model from threads and from asyncio, and cancellation when a consumer
stops reading.

The model is the memorizing plumbing fixture of `chat_fixtures.py`: it knows this agent's three
steps (call get_weather, call add, answer) by heart, so what is tested is the loop's plumbing.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from chat_fixtures import (
    AGENT_ANSWER,
    AGENT_QUESTION,
    CODE_ANSWER,
    CODE_QUESTION,
    STORY_ANSWER,
    STORY_QUESTION,
    TokenCounter,
    add,
    chat_checkpoint,
    get_weather,
)
from langchain.agents import create_agent
from langchain.agents.middleware import wrap_model_call
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict

from langchain_gemma_mtp import ChatGemmaMTP

HELLO_ANSWER = "Hello! How can I help you today?"


@pytest.fixture(scope="module")
def llm() -> ChatGemmaMTP:
    return ChatGemmaMTP(model=str(chat_checkpoint()))


def assert_agent_transcript(messages: list) -> None:
    human, call_1, result_1, call_2, result_2, answer = messages
    assert isinstance(human, HumanMessage) and human.content == AGENT_QUESTION
    assert [(c["name"], c["args"]) for c in call_1.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert isinstance(result_1, ToolMessage) and result_1.content == "sunny, 21C"
    assert result_1.tool_call_id == call_1.tool_calls[0]["id"]
    assert [(c["name"], c["args"]) for c in call_2.tool_calls] == [("add", {"a": 2, "b": 3})]
    assert isinstance(result_2, ToolMessage) and result_2.content == "5"
    assert isinstance(answer, AIMessage) and answer.content == AGENT_ANSWER and not answer.tool_calls


def test_create_agent_runs_a_two_tool_loop_streaming_messages(llm) -> None:
    agent = create_agent(llm, tools=[get_weather, add])
    counter = TokenCounter()
    model_chunks: list[AIMessageChunk] = []
    final = None
    for mode, payload in agent.stream(
        {"messages": [HumanMessage(AGENT_QUESTION)]}, stream_mode=["messages", "values"], config={"callbacks": [counter]}
    ):
        if mode == "values":
            final = payload
        elif payload[1]["langgraph_node"] == "model":
            model_chunks.append(payload[0])
    assert_agent_transcript(final["messages"])
    # Every chunk the model produced came through the stream, and through callbacks.
    assert all(isinstance(c, AIMessageChunk) for c in model_chunks)
    assert len(counter.chunks) == len(model_chunks)
    names = [tc["name"] for c in model_chunks for tc in c.tool_call_chunks]
    assert names == ["get_weather", "add"]
    answer_chunks = [c for c in model_chunks if c.content]
    assert len(answer_chunks) > 1 and "".join(c.content for c in answer_chunks) == AGENT_ANSWER
    assert [c.response_metadata["finish_reason"] for c in model_chunks if c.chunk_position == "last"] == [
        "tool_calls",
        "tool_calls",
        "stop",
    ]


async def test_create_agent_async(llm) -> None:
    agent = create_agent(llm, tools=[get_weather, add])
    contents = []
    async for chunk, metadata in agent.astream({"messages": [HumanMessage(AGENT_QUESTION)]}, stream_mode="messages"):
        if metadata["langgraph_node"] == "model":
            contents.append(chunk.content)
    assert "".join(contents) == AGENT_ANSWER
    result = await agent.ainvoke({"messages": [HumanMessage(AGENT_QUESTION)]})
    assert_agent_transcript(result["messages"])


def test_agent_middleware_model_settings_set_the_draft_hint(llm) -> None:
    @wrap_model_call
    def coder(request, handler):
        return handler(request.override(model_settings={"draft_hint": "code", "num_draft_tokens": 3}))

    result = create_agent(llm, tools=[get_weather, add], middleware=[coder]).invoke({"messages": [HumanMessage(AGENT_QUESTION)]})
    assert_agent_transcript(result["messages"])  # the same answer: draft lengths never change it
    for message in result["messages"]:
        if isinstance(message, AIMessage):
            speculative = message.response_metadata["speculative"]
            assert speculative["draft_hint"] == "code" and speculative["num_draft_tokens"] == 3


# -- three parallel nodes ---------------------------------------------------------------------------


class Answers(TypedDict, total=False):
    prose: dict
    code: dict
    story: dict


QUESTIONS = {"prose": "Hello", "code": CODE_QUESTION, "story": STORY_QUESTION}
EXPECTED = {"prose": HELLO_ANSWER, "code": CODE_ANSWER, "story": STORY_ANSWER}


def record(key: str, message: AIMessage) -> dict:
    return {
        key: {
            "text": message.content,
            "hint": message.response_metadata["speculative"]["draft_hint"],
            "thread": threading.current_thread().name,
        }
    }


def parallel_graph(llm: ChatGemmaMTP, *, asynchronous: bool):
    builder = StateGraph(Answers)
    for key, question in QUESTIONS.items():
        if asynchronous:

            async def node(state: Answers, key=key, question=question) -> dict:
                return record(key, await llm.ainvoke(question))
        else:

            def node(state: Answers, key=key, question=question) -> dict:
                return record(key, llm.invoke(question))

        builder.add_node(key, node)
        builder.add_edge(START, key)
        builder.add_edge(key, END)
    return builder.compile()


def test_three_parallel_nodes_from_threads(llm) -> None:
    result = parallel_graph(llm, asynchronous=False).invoke({})
    assert {k: v["text"] for k, v in result.items()} == EXPECTED
    assert {k: v["hint"] for k, v in result.items()} == {"prose": "prose", "code": "code", "story": "long_form"}
    assert len({v["thread"] for v in result.values()}) > 1  # LangGraph really ran the branches on several threads


async def test_three_parallel_nodes_from_asyncio(llm) -> None:
    result = await parallel_graph(llm, asynchronous=True).ainvoke({})
    assert {k: v["text"] for k, v in result.items()} == EXPECTED


def test_the_graph_config_draft_hint_is_a_fallback(llm) -> None:
    result = parallel_graph(llm, asynchronous=False).invoke({}, config={"configurable": {"draft_hint": 5}})
    assert {v["hint"] for v in result.values()} == {5}
    assert {k: v["text"] for k, v in result.items()} == EXPECTED


# -- a consumer that goes away cancels its request ----------------------------------------------------


@pytest.fixture
def counted() -> tuple[ChatGemmaMTP, list[int]]:
    """A model without drafting (one target forward per token), with its forwards counted."""
    llm = ChatGemmaMTP(model=str(chat_checkpoint()), drafter="none")
    forwards: list[int] = []
    engine = llm._backend_for_calls().runtime.engine
    handle = engine.target.decoder.register_forward_hook(lambda *args: forwards.append(1))
    yield llm, forwards
    handle.remove()


STORY_TOKENS = 150  # the story answer is longer than this; a cancelled request stops far earlier


def test_breaking_out_of_a_stream_cancels_the_request(counted) -> None:
    llm, forwards = counted
    for chunk in llm.stream(STORY_QUESTION):
        assert chunk.content
        break
    assert llm.invoke("Hello").content == HELLO_ANSWER  # the next request runs
    assert len(forwards) < 40, "the abandoned request kept generating"
    assert len(llm.invoke(STORY_QUESTION).content) == len(STORY_ANSWER) and len(forwards) > STORY_TOKENS


async def test_cancelling_a_task_cancels_its_request(counted) -> None:
    llm, forwards = counted
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in llm.astream(STORY_QUESTION):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (await llm.ainvoke("Hello")).content == HELLO_ANSWER
    assert len(forwards) < 40, "the cancelled request kept generating"
