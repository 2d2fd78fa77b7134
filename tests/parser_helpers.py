"""Feeding a streaming output parser piece by piece, for the parser tests."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from langchain_gemma_mtp.formats.streaming import ParsedDelta, StreamingParser


def drain(parser: StreamingParser, pieces: list[str]) -> ParsedDelta:
    """Feed `pieces` one by one and merge every delta; ids are blanked so runs compare equal."""
    total = ParsedDelta()
    for piece in pieces:
        total.extend(parser.feed(piece))
    total.extend(parser.finish())
    total.tool_calls = [dataclasses.replace(c, id=None) for c in total.tool_calls]
    total.invalid_tool_calls = [dataclasses.replace(c, id="") for c in total.invalid_tool_calls]
    return total


def split_at(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at the given positions (taken modulo its length + 1), in order."""
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def summary(parsed: ParsedDelta) -> dict[str, Any]:
    """What an answer means: content, reasoning, calls with decoded arguments, invalid calls."""
    return {
        "content": parsed.content,
        "reasoning": parsed.reasoning,
        "calls": [(c.index, c.name, json.loads(c.arguments)) for c in parsed.tool_calls],
        "invalid": [(c.index, c.name, c.raw, c.error) for c in parsed.invalid_tool_calls],
    }
