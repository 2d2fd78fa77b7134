"""Draft hints: "auto" detection rules, validation, and the documented hint-to-length table."""

from __future__ import annotations

import re

import pytest

from langchain_gemma_mtp import hints
from langchain_gemma_mtp.draft_settings import HINT_KINDS
from langchain_gemma_mtp.engine.drafters import MTPDrafter
from langchain_gemma_mtp.engine.schedule import HINT_PRIOR_ALPHA, best_draft_length
from langchain_gemma_mtp.errors import InvalidRequestError
from langchain_gemma_mtp.hints import detect_kind, resolve_draft_hint

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


@pytest.mark.parametrize(
    "messages,tools,tool_choice,kind",
    [
        # tool_call: forced, or tools offered to a fresh user turn
        ([user("Hello")], TOOLS, "required", "tool_call"),
        ([user("Hello")], TOOLS, {"type": "function", "function": {"name": "get_weather"}}, "tool_call"),
        ([user("Weather in Paris?")], TOOLS, None, "tool_call"),
        # ... but not when the turn answers a tool result, nor when tools are switched off
        ([user("Weather?"), {"role": "tool", "content": "sunny"}], TOOLS, None, "prose"),
        ([user("Weather in Paris?")], TOOLS, "none", "prose"),
        # code: fences, coder system prompts, requests for code
        ([user("What does this do?\n```\nx = 1\n```")], None, None, "code"),
        ([system("You are a senior Python developer."), user("Hi")], None, None, "code"),
        ([system("You are a C++ expert."), user("Hi")], None, None, "code"),
        ([user("Write a Python function that adds two numbers.")], None, None, "code"),
        ([user("Please fix the bug in my SQL query")], None, None, "code"),
        # long form
        ([user("Write an essay on the French revolution.")], None, None, "long_form"),
        ([user("Explain photosynthesis in 5 paragraphs.")], None, None, "long_form"),
        # prose: everything else, including JSON mentioned as data
        ([user("Hello")], None, None, "prose"),
        ([system("Reply in JSON."), user("Name a fruit.")], None, None, "prose"),
        ([user("What is 2 + 3?")], None, None, "prose"),
    ],
)
def test_auto_detection(messages, tools, tool_choice, kind) -> None:
    assert detect_kind(messages, tools, tool_choice) == kind
    assert resolve_draft_hint("auto", messages, tools, tool_choice) == kind


def test_list_content_is_read_as_text() -> None:
    assert detect_kind([{"role": "user", "content": [{"type": "text", "text": "Write a Python script"}]}]) == "code"


@pytest.mark.parametrize("hint", ["code", "prose", "tool_call", "long_form", 0, 7, 16])
def test_explicit_hints_pass_through(hint) -> None:
    assert resolve_draft_hint(hint, [user("Write a story")], TOOLS, "required") == hint


@pytest.mark.parametrize("hint", ["poetry", 17, -1, True, None, 2.5])
def test_bad_hints_raise(hint) -> None:
    with pytest.raises(InvalidRequestError, match="draft_hint"):
        resolve_draft_hint(hint, [user("Hi")])


def test_documented_lengths_match_the_engine_priors_for_mtp() -> None:
    """The module docstring's table says where each kind starts; the engine's schedule decides it."""
    table = dict(re.findall(r'``"(\w+)"``\s+adaptive, starts at (\d+)', hints.__doc__))
    assert set(table) == set(HINT_KINDS)
    for kind, length in table.items():
        assert best_draft_length(HINT_PRIOR_ALPHA[kind], MTPDrafter.cost_per_draft_token) == int(length), kind
