"""Feeding a streaming output parser piece by piece, for the parser tests."""

from __future__ import annotations

import dataclasses

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
