"""Draft hints: the kinds a call can name, and how "auto" picks one from the request.

A draft hint tells the engine what kind of text a call will produce, so it drafts the right
number of tokens ahead. How each hint maps to a draft length:

======================  =====================================================================
hint                    draft length
======================  =====================================================================
``"code"``              adaptive, starts at 4 (code branches often: short drafts waste less)
``"prose"``             adaptive, starts at 6
``"tool_call"``         adaptive, starts at 7 (call syntax and argument names repeat well)
``"long_form"``         adaptive, starts at 10 (long, regular prose: long drafts pay off)
``"auto"`` (default)    one of the four kinds above, picked from the request by `detect_kind`
an int ``n``            exactly ``n`` draft tokens every step, 0..MAX_DRAFT_TOKENS; 0: no drafting
``num_draft_tokens=n``  exactly ``n`` draft tokens every step, whatever the hint says
======================  =====================================================================

"Adaptive" means each kind keeps its own acceptance estimate inside the engine and picks the
draft length with the most expected tokens per unit of cost (see `engine/schedule.py`); the
starting lengths above are the engine's priors for an MTP drafter and move as a kind's
acceptance is observed, separately per kind, so a coder node and a writer node tune themselves
apart. A seeded call adapts on a private copy of its kind's prior, so a seed reproduces its output.

Rules of "auto", first match wins:

1. ``tool_call``: the request forces a tool call (tool_choice any/required/a name), or offers
   tools and ends with a user turn (an agent step that has not called its tools yet).
2. ``code``: the last user turn or the system prompt holds a code fence, or the system prompt
   casts the model as a coder, or the last user turn asks to write, fix or explain code.
3. ``long_form``: the last user turn asks for a long text (essay, story, article, report, ...).
4. ``prose``: everything else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .draft_settings import HintKind, check_draft_hint

DraftHint = Literal["auto"] | HintKind | int

_FENCE = re.compile(r"```")
# Programming languages only: JSON or YAML in a prompt is usually data, not a request for code.
_LANGUAGES = r"python|javascript|typescript|java|rust|golang|c\+\+|c#|kotlin|swift|ruby|php|bash|shell|sql|html|css|regex"
# A system prompt that makes the model a programmer. (?<!\w)...(?!\w) rather than \b: "c++" ends in no word character.
_CODER_SYSTEM = re.compile(
    rf"(?<!\w)(coding|coder|programmer|software engineer|developer|code review(er)?|write code|{_LANGUAGES})(?!\w)",
    re.IGNORECASE,
)
# A user turn that asks for code: a verb of writing or fixing, then a programming noun close after it.
_CODE_REQUEST = re.compile(
    r"\b(write|implement|fix|debug|refactor|complete|explain|review|optimi[sz]e|add|generate|translate|port)\b"
    rf".{{0,80}}(?<!\w)(code|function|method|class|script|program|snippet|query|unit tests?|{_LANGUAGES})(?!\w)",
    re.IGNORECASE | re.DOTALL,
)
_LONG_FORM = re.compile(
    r"\b(essay|story|article|report|blog post|chapter|letter|speech|novel|long|in detail|detailed|"
    r"comprehensive|(\d+|several|many|multiple)\s+(paragraphs|pages|sections))\b",
    re.IGNORECASE,
)
_FORCING_CHOICES = ("any", "required")


def _text(content: Any) -> str:
    """The text of an OpenAI-style message content (a string or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def forces_tool_call(tool_choice: Any) -> bool:
    """Whether an OpenAI-style tool_choice makes the model call a tool."""
    return tool_choice in _FORCING_CHOICES or isinstance(tool_choice, Mapping)


def detect_kind(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
) -> HintKind:
    """The kind of text this request will most likely produce (the rules of "auto" above).

    `messages` are OpenAI-style dicts; `tool_choice` is OpenAI-style ("auto", "none",
    "required", or {"type": "function", "function": {"name": ...}}).
    """
    if tools and tool_choice != "none":
        if forces_tool_call(tool_choice) or (messages and messages[-1].get("role") == "user"):
            return "tool_call"
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    last_user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    if _FENCE.search(last_user) or _FENCE.search(system) or _CODER_SYSTEM.search(system):
        return "code"
    if _CODE_REQUEST.search(last_user):
        return "code"
    if _LONG_FORM.search(last_user):
        return "long_form"
    return "prose"


def resolve_draft_hint(
    hint: DraftHint,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    tool_choice: Any = None,
) -> str | int:
    """The concrete hint the engine gets: "auto" becomes a kind; a kind or an int passes through."""
    check_draft_hint(hint)
    if hint == "auto":
        return detect_kind(messages, tools, tool_choice)
    return hint
