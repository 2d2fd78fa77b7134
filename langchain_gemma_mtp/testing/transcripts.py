"""Transcripts a memorizing model learns: one chat request (as ChatGemmaMTP sends it) and its completion."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langgraph.prebuilt.tool_node import msg_content_output

from ..formats import to_gemma4_value
from ..messages import from_langchain
from ..runtime import ChatRequest

TURN_END = "<turn|>"


@dataclass
class Transcript:
    """One chat request (LangChain input and call options) and the completion the model learns."""

    input: str | list[BaseMessage]
    completion: str  # output text after the prompt (and after any forced opening), end marker included
    options: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # None: the tokenizer's (Gemma 4) template

    def request(self) -> ChatRequest:
        messages = [HumanMessage(self.input)] if isinstance(self.input, str) else self.input
        return ChatRequest(messages=from_langchain(messages), **self.options)


@functools.cache
def _binder() -> Any:
    from ..chat_models import ChatGemmaMTP

    return ChatGemmaMTP(model="transcript-binder")  # binds options only; never loads a model


def tool_options(tools: Sequence[Any], tool_choice: Any = None, **kwargs: Any) -> dict[str, Any]:
    """The call options `bind_tools(tools, tool_choice=..., **kwargs)` stores, as a request sees them."""
    return dict(_binder().bind_tools(tools, tool_choice=tool_choice, **kwargs).kwargs)


def structured_options(schema: Any, method: str) -> dict[str, Any]:
    """The call options `with_structured_output` binds (its tracing entry left out, as LangChain does)."""
    options = dict(_binder().with_structured_output(schema, method=method).first.kwargs)
    options.pop("ls_structured_output_format")
    return options


def call_text(name: str, args: dict[str, Any]) -> str:
    """A Gemma 4 tool call as the model writes it, up to the marker that hands over to the tools."""
    return f"<|tool_call>call:{name}{to_gemma4_value(args)}<tool_call|><|tool_response>"


def tool_loop(
    question: str | list[BaseMessage],
    calls: Sequence[tuple[BaseTool, dict[str, Any]]],
    answer: str,
    options: dict[str, Any],
) -> list[Transcript]:
    """The model calls of one agent run: each tool call in turn (the tool really runs to give its
    result to the next call's history), then the final answer."""
    history: list[BaseMessage] = [HumanMessage(question)] if isinstance(question, str) else list(question)
    transcripts = []
    for i, (tool, args) in enumerate(calls):
        transcripts.append(Transcript(list(history), call_text(tool.name, args), options))
        call_id = f"call_{i}"
        history.append(AIMessage("", tool_calls=[{"name": tool.name, "args": args, "id": call_id, "type": "tool_call"}]))
        # The result as LangGraph's ToolNode puts it in a ToolMessage.
        # The content as ToolNode gives it (a list[dict] is a valid content list; lists are invariant).
        content = cast(str | list[str | dict], msg_content_output(tool.invoke(args)))
        history.append(ToolMessage(content, tool_call_id=call_id, name=tool.name))
    transcripts.append(Transcript(history, answer + TURN_END, options))
    return transcripts
