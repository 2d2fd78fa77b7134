"""What the server bounds before any model work: the JSON a body may hold, and the requests it runs and queues.

`read_json_object` turns a body into a dict or raises InvalidRequestError: not JSON, not UTF-8,
NaN or Infinity, nesting deeper than MAX_JSON_DEPTH (the parsers, pydantic and the chat template
all recurse), or a string that is not valid Unicode (a lone surrogate such as "\\ud800", which
no tokenizer can encode). `Admission` lets `max_running` requests run and `max_queued` wait
for a slot, in arrival order; the next one is refused at once with ServerBusyError (429).
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

from ..errors import InvalidRequestError, ServerBusyError

# Deepest nesting of a body: OpenAI bodies need about 10 levels (a tool's JSON schema a few more).
MAX_JSON_DEPTH = 64
RETRY_AFTER_S = 1


def _no_constant(name: str) -> Any:
    raise InvalidRequestError(f"the request body holds {name}, which is not JSON: send numbers only.")


def read_json_object(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """The body as a JSON object, checked for depth and text (see the module docstring)."""
    too_deep = InvalidRequestError(f"the request body nests deeper than {max_depth} levels of arrays and objects: flatten it.")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise too_deep from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON in UTF-8: {exc}.") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(data).__name__}.")
    # Iterative walk: a check that recursed would fail on the very bodies it is for.
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
            continue
        if isinstance(value, dict):
            children = [*value.keys(), *value.values()]
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            raise too_deep
        stack.extend((child, depth + 1) for child in children)
    return data


def _check_text(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the request body holds a string that is not valid Unicode ({exc.reason} at {exc.start}, e.g. a lone "
            "surrogate escape such as \\ud800): send UTF-8 text, with surrogate pairs only in pairs."
        ) from exc


class Admission:
    """At most `max_running` requests running and `max_queued` waiting for a slot; one more is a 429.

    Used from the server's event loop only. A slot is held from `enter` until `leave`, whatever
    the request's end (answered, failed, client gone).
    """

    def __init__(self, max_running: int, max_queued: int) -> None:
        if max_running < 1 or max_queued < 0:
            raise InvalidRequestError(f"max_running must be >= 1 and max_queued >= 0, got {max_running} and {max_queued}.")
        self.max_running = max_running
        self.max_queued = max_queued
        self.running = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return sum(not waiter.done() for waiter in self._waiters)

    async def enter(self) -> None:
        """Take a slot, waiting in line for one; ServerBusyError at once when the line is full."""
        if self.running < self.max_running and not self.queued:
            self.running += 1
            return
        if self.queued >= self.max_queued:
            raise ServerBusyError(
                f"this server is busy: {self.running} requests running and {self.queued} queued, its limits "
                f"(--max-concurrent {self.max_running}, --max-queued {self.max_queued}): retry after {RETRY_AFTER_S} s."
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # `leave` hands its slot over: running stays counted
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a slot just as the request was cancelled: pass it on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def leave(self) -> None:
        """Give a slot back: to the first request in line, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1
