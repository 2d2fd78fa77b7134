"""Streaming base for output parsers: splits model text into content and marked regions, holding back split markers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass
class ToolCallDelta:
    """A piece of one tool call, OpenAI-style: the first piece has id and name, later ones add arguments."""

    index: int
    id: str | None
    name: str | None
    arguments: str  # a piece of the JSON arguments text


@dataclass
class InvalidToolCall:
    """A tool call that could not be used; `raw` is its text exactly as the model wrote it."""

    index: int
    id: str
    name: str | None
    raw: str
    error: str


@dataclass
class ParsedDelta:
    """What one `feed` or `finish` adds to the answer."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls or self.invalid_tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        """Add a later delta to this one; tool-call pieces with the same index merge into one call.

        Accumulate into a fresh `ParsedDelta()` to get whole calls (the non-streaming answer).
        """
        self.content += other.content
        self.reasoning += other.reasoning
        by_index = {call.index: call for call in self.tool_calls}
        for piece in other.tool_calls:
            call = by_index.get(piece.index)
            if call is None:
                by_index[piece.index] = call = ToolCallDelta(piece.index, piece.id, piece.name, "")
                self.tool_calls.append(call)
            call.id = call.id or piece.id
            call.name = call.name or piece.name
            call.arguments += piece.arguments
        self.invalid_tool_calls.extend(other.invalid_tool_calls)


@dataclass(frozen=True)
class Region:
    """A stretch of output between two markers.

    A streaming region hands its text on as it arrives (reasoning); any other region is
    handed over whole once it closes (a tool call needs all of its body to parse).
    """

    open: str
    close: str
    streams: bool


def partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class StreamingParser:
    """Feed decoded text piece by piece; get content, reasoning and tool calls back as deltas.

    Text outside regions is content, less any `drops` marker (a control token that means
    nothing there, such as a stray close marker). A marker split across feeds is held back
    until it is complete (or shown not to be a marker), so no marker text ever leaks into
    content or reasoning, whatever the split. Subclasses declare `regions` and `drops` and
    implement the hooks.
    """

    regions: tuple[Region, ...] = ()
    drops: tuple[str, ...] = ()

    def __init__(self, tool_names: set[str] | None = None) -> None:
        self.tool_names = frozenset(tool_names) if tool_names is not None else None
        self._buf = ""  # text not yet handed on
        self._region: Region | None = None
        self._body: list[str] = []  # a whole region's text read so far, less _buf
        self._next_index = 0
        self._opens = tuple(r.open for r in self.regions) + self.drops

    def feed(self, text: str) -> ParsedDelta:
        """Parse the next piece of model output."""
        delta = ParsedDelta()
        self._buf += text
        self._drain(delta, final=False)
        return delta

    def finish(self) -> ParsedDelta:
        """Flush at the end of generation: held-back text, and any region left open."""
        delta = ParsedDelta()
        self._drain(delta, final=True)
        if self._region is not None:
            region, body = self._region, "".join(self._body) + self._buf
            self._buf, self._body, self._region = "", [], None
            if region.streams:
                self.region_text(region, body, delta)
                body = ""
            self.region_end(region, body, False, delta)
        return delta

    def _drain(self, delta: ParsedDelta, final: bool) -> None:
        while True:
            if self._region is not None:
                if not self._drain_region(self._region, delta, final):
                    return
                continue
            found = self._first_open()
            if found is None:
                keep = 0 if final else partial_marker_len(self._buf, self._opens)
                delta.content += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep :]
                return
            start, marker = found
            delta.content += self._buf[:start]
            self._buf = self._buf[start + len(marker) :]
            region = next((r for r in self.regions if r.open == marker), None)
            if region is not None:
                self.enter(region)

    def enter(self, region: Region) -> None:
        """Continue inside `region`, as if its open marker had just been read."""
        self._region, self._body = region, []
        self.region_start(region)

    def _first_open(self) -> tuple[int, str] | None:
        """The first region open or dropped marker in the buffer, with its position."""
        hits = [(i, m) for m in self._opens if (i := self._buf.find(m)) >= 0]
        return min(hits, key=lambda hit: hit[0]) if hits else None

    def _drain_region(self, region: Region, delta: ParsedDelta, final: bool) -> bool:
        """Pass on what the open region allows; True when it ended and parsing goes on after it."""
        if region.streams:
            end = self._buf.find(region.close)
            if end < 0:
                keep = 0 if final else partial_marker_len(self._buf, (region.close,))
                self.region_text(region, self._buf[: len(self._buf) - keep], delta)
                self._buf = self._buf[len(self._buf) - keep :]
                return False
            self.region_text(region, self._buf[:end], delta)
            self._buf = self._buf[end + len(region.close) :]
            self._region = None
            self.region_end(region, "", True, delta)
            return True
        end = self._buf.find(region.close)
        # The same region opening again before this one closed means the model started over:
        # end this one there as unclosed and parse the next on its own.
        restart = self._buf.find(region.open)
        if restart >= 0 and (end < 0 or restart < end):
            body, self._buf = "".join(self._body) + self._buf[:restart], self._buf[restart:]
            self._body, self._region = [], None
            self.region_end(region, body, False, delta)
            return True
        if end < 0:
            # Bank all but what could start a marker, so a long body is copied once, not per feed.
            keep = max(len(region.close), len(region.open)) - 1
            if len(self._buf) > keep:
                self._body.append(self._buf[:-keep])
                self._buf = self._buf[-keep:]
            return False
        body, self._buf = "".join(self._body) + self._buf[:end], self._buf[end + len(region.close) :]
        self._body, self._region = [], None
        self.region_end(region, body, True, delta)
        return True

    # Hooks for subclasses.

    def region_start(self, region: Region) -> None:
        """A region just opened."""

    def region_text(self, region: Region, text: str, delta: ParsedDelta) -> None:
        """More text of an open streaming region."""

    def region_end(self, region: Region, body: str, closed: bool, delta: ParsedDelta) -> None:
        """A region ended: `body` is its whole text for non-streaming regions ("" for streaming
        ones); `closed` is False when the output ended, or the region restarted, before its close marker."""

    # Tool-call helpers shared by the parsers.

    def check_tool_name(self, name: str) -> str | None:
        """Why `name` cannot be called, or None when it can."""
        if self.tool_names is not None and name not in self.tool_names:
            declared = ", ".join(sorted(self.tool_names)) or "none"
            return f"tool {name!r} was not declared (declared: {declared})"
        return None

    def emit_call(self, delta: ParsedDelta, name: str, arguments_json: str) -> None:
        """A good call: its name first, then its arguments as a second piece."""
        index, self._next_index = self._next_index, self._next_index + 1
        delta.tool_calls.append(ToolCallDelta(index, new_call_id(), name, ""))
        delta.tool_calls.append(ToolCallDelta(index, None, None, arguments_json))

    def emit_invalid(self, delta: ParsedDelta, name: str | None, raw: str, error: str) -> None:
        # Invalid calls share the index sequence with good ones, so every call keeps its place in the output.
        index, self._next_index = self._next_index, self._next_index + 1
        delta.invalid_tool_calls.append(InvalidToolCall(index, new_call_id(), name, raw, error))
