"""Our fixture templates render, byte for byte, what every published Gemma 4 chat-template revision renders.

golden.json holds the published templates' renders of each conversation (recorded at dev time by
tests/fixtures/gemma4_templates/make_golden.py); here our templates render the same conversations
through the same transformers `apply_chat_template` path the runtime uses.
"""

from __future__ import annotations

import json

import pytest
from gemma4_revisions import GOLDEN, REVISIONS, golden_cases, revision

CASES = golden_cases()


def render(rev, case: dict) -> str:
    return rev.render(case["messages"], case["tools"], **case["kwargs"])


@pytest.mark.parametrize("rev", REVISIONS, ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_renders_what_the_published_revision_renders(rev, case) -> None:
    expected = case["expected"][rev.name]
    if isinstance(expected, dict):
        with pytest.raises(Exception):  # noqa: B017 - the published template raised (TemplateError or TypeError)
            render(rev, case)
    else:
        assert render(rev, case) == expected


def test_golden_covers_every_revision_and_the_revisions_differ() -> None:
    sources = json.loads(GOLDEN.read_text(encoding="utf-8"))["sources"]
    assert set(sources) == {r.name for r in REVISIONS}
    # Any two revisions render some conversation differently: none of them is a duplicate.
    for rev in REVISIONS:
        for other in REVISIONS:
            if other is not rev:
                assert any(c["expected"][rev.name] != c["expected"][other.name] for c in CASES), (rev, other)


@pytest.mark.parametrize("rev", REVISIONS, ids=str)
def test_revision_facts_match_the_renders(rev) -> None:
    """The helper's facts about each revision (used by other tests) agree with what it renders."""
    plain = next(c for c in CASES if c["name"] == "plain")["expected"][rev.name]
    assert plain.endswith(rev.thinking_off_prompt) and not plain.endswith("<channel|>" + rev.thinking_off_prompt)
    after_tools = next(c for c in CASES if c["name"] == "tool_loop_prompt_thinking")["expected"][rev.name]
    assert after_tools.endswith("<tool_response|><|channel>thought\n") == rev.thought_after_tools
    strings = next(c for c in CASES if c["name"] == "string_arguments")["expected"][rev.name]
    assert isinstance(strings, dict) == rev.string_arguments_raise
    assert revision(rev.name) is rev
    assert f"ollama {rev.ollama_commit}" in rev.template


def test_unknown_revision_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="july_e2b"):
        revision("june")
