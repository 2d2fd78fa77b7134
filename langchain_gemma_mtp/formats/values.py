"""Lenient reader for JSON-like values: Gemma 4's quote token, bare keys, and the small slips models make in JSON."""

from __future__ import annotations

import json
import math
import re

# scanstring is public in CPython's json.decoder but missing from typeshed.
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any, NoReturn

GEMMA_QUOTE = '<|"|>'

_WS = re.compile(r"\s*")
_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_WORD = re.compile(r"[A-Za-z_]\w*")
# A bare key runs up to the colon (`k-1`, `a b`, as vLLM and llama.cpp read Gemma 4 keys); it
# starts and ends with a visible character, and structure, quotes and newlines cannot be in one.
_BARE_KEY = re.compile(r"[^\s:,{}\[\]\"'](?:[^:,{}\[\]\"'\n]*[^\s:,{}\[\]\"'])?")
# An unquoted value runs up to the next comma, closer, newline or quote token.
_BARE_RUN = re.compile(r'(?:(?!<\|"\|>)[^,}\]\n{\[])*')


def _run_end(pattern: re.Pattern[str], text: str, pos: int) -> int:
    """Where a run of `pattern` from `pos` ends; the run patterns match the empty string, so they always match."""
    match = pattern.match(text, pos)
    assert match is not None
    return match.end()


_WORDS = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}
# Far deeper than any real tool argument, and well inside Python's recursion limit.
_MAX_DEPTH = 200


def read_value(text: str, *, close_unterminated: bool = False, bare_strings: bool = False) -> Any:
    """Read one value that fills `text` (surrounding whitespace allowed).

    Accepts JSON plus: strings quoted with Gemma 4's `<|"|>` token (raw, no escapes) or with
    single quotes; bare object keys (`city`, `k-1`, `a b`); Python's True/False/None; trailing
    commas. With `close_unterminated`, strings, objects and lists left open at the end of the
    text are closed (a truncated call keeps everything it wrote; nothing is dropped). With
    `bare_strings` (Gemma 4 arguments), single-quoted strings are raw like `<|"|>` ones, and
    an unquoted value that is not a number or a literal is a string (`unit:celsius`,
    `expr:432+1`, as vLLM reads them); one holding a colon or a double quote, or a space inside
    a list, is refused: it more likely hides a missing comma or quote than means itself.
    Raises ValueError, naming the position, when the text is not such a value.
    """
    reader = _Reader(text, close_unterminated, bare_strings)
    value = reader.value(0)
    reader.skip_ws()
    if reader.pos < len(text):
        reader.fail("unexpected text after the value")
    return value


class _Reader:
    """Recursive-descent reader over one string; `pos` is the next unread character."""

    def __init__(self, text: str, close_unterminated: bool, bare_strings: bool) -> None:
        self.text = text
        self.pos = 0
        self.close_unterminated = close_unterminated
        self.bare_strings = bare_strings

    def fail(self, reason: str) -> NoReturn:
        snippet = self.text[self.pos : self.pos + 30]
        where = f"at position {self.pos} ({snippet!r})" if snippet else "at the end of the text"
        raise ValueError(f"{reason} {where}")

    def skip_ws(self) -> None:
        self.pos = _run_end(_WS, self.text, self.pos)

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def value(self, depth: int, in_list: bool = False) -> Any:
        if depth > _MAX_DEPTH:
            self.fail(f"values nested more than {_MAX_DEPTH} deep")
        self.skip_ws()
        if self.at_end():
            self.fail("expected a value")
        char = self.text[self.pos]
        if char == "{":
            return self.object(depth)
        if char == "[":
            return self.array(depth)
        if self.at_string():
            return self.string()
        if self.bare_strings:
            return self.bare_value(in_list)
        number = _NUMBER.match(self.text, self.pos)
        if number:
            return self.number(number)
        word = _WORD.match(self.text, self.pos)
        if word and word.group() in _WORDS:
            self.pos = word.end()
            return _WORDS[word.group()]
        if word:
            self.fail(f"unquoted word {word.group()!r} is not a value (strings must be quoted)")
        self.fail("expected a value")

    def bare_value(self, in_list: bool) -> Any:
        """An unquoted value, read whole: a literal, a number, or else a string."""
        start = self.pos
        token = self.text[start : _run_end(_BARE_RUN, self.text, start)].rstrip()
        if not token:
            self.fail("expected a value")
        if token in _WORDS:
            self.pos = start + len(token)
            return _WORDS[token]
        number = _NUMBER.match(self.text, start) if _NUMBER.fullmatch(token) else None
        if number:
            return self.number(number)
        # In a list, spaces could be a missing comma (`[1 2]`); in an object, that shows as a colon.
        if ":" in token or '"' in token or (in_list and any(c.isspace() for c in token)):
            self.fail(f"unquoted value {token!r} is ambiguous (quote it with {GEMMA_QUOTE})")
        self.pos = start + len(token)
        return token

    def at_string(self) -> bool:
        return self.text.startswith(GEMMA_QUOTE, self.pos) or self.text[self.pos] in "\"'"

    def string(self) -> str:
        text, start = self.text, self.pos
        if text.startswith(GEMMA_QUOTE, start):
            # Gemma 4 strings are raw: everything up to the next quote token.
            body_start = start + len(GEMMA_QUOTE)
            end = text.find(GEMMA_QUOTE, body_start)
            if end < 0:
                if not self.close_unterminated:
                    self.fail(f"unterminated string (no closing {GEMMA_QUOTE})")
                end = len(text)
            self.pos = min(end + len(GEMMA_QUOTE), len(text))
            return text[body_start:end]
        if text[start] == '"':
            return self.json_string()
        if self.bare_strings:
            return self.raw_single_quoted_string()
        return self.single_quoted_string()

    def json_string(self) -> str:
        try:
            # strict=False lets raw newlines and tabs through: models write them inside strings.
            value, self.pos = scanstring(self.text, self.pos + 1, False)
            return value
        except json.JSONDecodeError as exc:
            if not (self.close_unterminated and exc.msg.startswith("Unterminated string")):
                self.pos = exc.pos
                self.fail(f"bad string: {exc.msg}")
        body = self.text[self.pos + 1 :]
        if (len(body) - len(body.rstrip("\\"))) % 2:
            body = body[:-1]  # a dangling backslash escapes nothing yet
        self.pos = len(self.text)
        try:
            return scanstring(body + '"', 0, False)[0]
        except json.JSONDecodeError as exc:
            self.fail(f"bad string: {exc.msg}")

    def single_quoted_string(self) -> str:
        # Re-spell the body as a JSON string: \' becomes ', a bare " gets escaped, other escapes stay.
        text, i = self.text, self.pos + 1
        out: list[str] = []
        while i < len(text):
            char = text[i]
            if char == "'":
                self.pos = i + 1
                return self.decode_respelled(out, i)
            if char == "\\" and i + 1 < len(text):
                nxt = text[i + 1]
                out.append("'" if nxt == "'" else "\\" + nxt)
                i += 2
                continue
            out.append('\\"' if char == '"' else char)
            i += 1
        if not self.close_unterminated:
            self.fail("unterminated string (no closing ')")
        self.pos = len(text)
        return self.decode_respelled(out, len(text))

    def raw_single_quoted_string(self) -> str:
        # Gemma 4 strings are raw, so a single-quoted one is too (`':\s*\w+'`, as ollama reads it):
        # a backslash only keeps the quote after it from ending the string, and stays in the text.
        text, i = self.text, self.pos + 1
        while i < len(text) and text[i] != "'":
            i += 2 if text[i] == "\\" else 1
        if i >= len(text):
            self.fail("unterminated string (no closing ')")
        body, self.pos = text[self.pos + 1 : i], i + 1
        return body

    def decode_respelled(self, body: list[str], end: int) -> str:
        try:
            return scanstring('"' + "".join(body) + '"', 1, False)[0]
        except json.JSONDecodeError as exc:
            self.pos = end
            self.fail(f"bad string: {exc.msg}")

    def number(self, match: re.Match[str]) -> int | float:
        token = match.group()
        self.pos = match.end()
        if not any(c in token for c in ".eE"):
            return int(token)
        value = float(token)
        if not math.isfinite(value):
            self.fail(f"number {token} is out of range")
        return value

    def object(self, depth: int) -> dict[str, Any]:
        self.pos += 1  # {
        result: dict[str, Any] = {}
        while True:
            self.skip_ws()
            if self.at_end():
                if self.close_unterminated:
                    return result
                self.fail("unterminated object (no closing })")
            if self.text[self.pos] == "}":
                self.pos += 1
                return result
            key = self.key()
            self.skip_ws()
            if self.at_end() or self.text[self.pos] != ":":
                self.fail(f"expected ':' after key {key!r}")
            self.pos += 1
            result[key] = self.value(depth + 1)
            self.after_item("}")

    def key(self) -> str:
        if self.at_string():
            return self.string()
        bare = _BARE_KEY.match(self.text, self.pos)
        if not bare:
            self.fail("expected a key")
        self.pos = bare.end()
        return bare.group()

    def array(self, depth: int) -> list[Any]:
        self.pos += 1  # [
        result: list[Any] = []
        while True:
            self.skip_ws()
            if self.at_end():
                if self.close_unterminated:
                    return result
                self.fail("unterminated list (no closing ])")
            if self.text[self.pos] == "]":
                self.pos += 1
                return result
            result.append(self.value(depth + 1, in_list=True))
            self.after_item("]")

    def after_item(self, closer: str) -> None:
        """Consume the comma after an item; the closer itself is left for the caller's loop."""
        self.skip_ws()
        if self.at_end() or self.text[self.pos] == closer:
            return
        if self.text[self.pos] != ",":
            self.fail(f"expected ',' or '{closer}'")
        self.pos += 1
