"""HTTPBackend: ChatGemmaMTP's requests sent to an OpenAI-compatible server (`gemma-mtp serve`, vLLM) over httpx.

It yields the same deltas as the in-process ChatRuntime (`runtime.py`), read back from the
server's chunks by `wire.runtime_delta`, so ChatGemmaMTP converts both paths the same way. The
final delta carries `finish_reason`, `usage` and `speculative` when the server sends them (a
server without our extension sends no speculative stats). Errors come back typed
(`errors.error_for_status`); connection failures and 408/429/5xx answers are retried
`max_retries` times, before any output is read, after the server's `Retry-After` when it sends one
(else exponential backoff), plus random jitter so clients turned away together do not all come back
together. Closing a stream early closes the connection, which cancels the generation on our server.

Token counts come from the server's `POST /tokenize` (vLLM's endpoint, served at the root beside
`/v1`), so they are the served model's own; `context_length` reads `max_model_len` of `/v1/models`.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import random
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx

from .errors import ServerError, error_for_status
from .runtime import ChatRequest, Completion
from .wire import request_body, runtime_delta, runtime_usage, tokenize_body

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is waited out this long (the next answer may say more)
JITTER = 0.25  # each wait grows by up to this fraction, at random
_PATH = "/chat/completions"


class HTTPBackend:
    """Runs requests on an OpenAI-compatible server; sync and asyncio, streaming or not."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout: float | None = 600.0,
        max_retries: int = 2,
        *,
        headers: Mapping[str, str] | None = None,
        client_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        """headers: sent with every request (beside the API key's Authorization); client_kwargs:
        options of httpx.Client and httpx.AsyncClient (verify, proxy, limits, ...)."""
        self.base_url = base_url.rstrip("/")
        # vLLM and our server answer /tokenize at the root, beside /v1.
        self.root_url = self.base_url.removesuffix("/v1")
        self.model = model
        self.max_retries = max_retries
        extra = dict(client_kwargs or {})
        sent = {**extra.pop("headers", {}), **(headers or {})}
        if api_key:
            sent["Authorization"] = f"Bearer {api_key}"
        self._options: dict[str, Any] = {"timeout": httpx.Timeout(timeout), **extra, "base_url": self.base_url, "headers": sent}
        self._client = httpx.Client(**self._options)
        # An AsyncClient's connections belong to one event loop: one client per loop.
        self._async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = weakref.WeakKeyDictionary()

    def _async_client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async_clients.get(loop)
        if client is None:
            client = self._async_clients[loop] = httpx.AsyncClient(**self._options)
        return client

    # -- sending, with retries ------------------------------------------------------------------

    def _send(self, body: dict[str, Any] | None, path: str = _PATH) -> httpx.Response:
        """POST `body` to `path` (GET without a body), retried; the response is open for streaming."""
        for attempt in range(self.max_retries + 1):
            request = self._client.build_request("POST" if body is not None else "GET", path, json=body)
            response = None
            try:
                response = self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise _unreachable(self.base_url, exc) from exc
            else:
                if not _retry(response, attempt, self.max_retries):
                    if response.is_error:
                        response.read()
                        response.close()
                        raise _error_of(response)
                    return response
                response.close()
            time.sleep(_delay(response, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _asend(self, body: dict[str, Any]) -> httpx.Response:
        client = self._async_client()
        for attempt in range(self.max_retries + 1):
            request = client.build_request("POST", _PATH, json=body)
            response = None
            try:
                response = await client.send(request, stream=True)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise _unreachable(self.base_url, exc) from exc
            else:
                if not _retry(response, attempt, self.max_retries):
                    if response.is_error:
                        await response.aread()
                        await response.aclose()
                        raise _error_of(response)
                    return response
                await response.aclose()
            await asyncio.sleep(_delay(response, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _json(self, body: dict[str, Any] | None, path: str) -> dict[str, Any]:
        response = self._send(body, path)
        try:
            return json.loads(response.read())
        finally:
            response.close()

    # -- the Backend protocol -------------------------------------------------------------------

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        response = self._send(request_body(request, self.model, stream=True))
        reader = _StreamReader()
        try:
            for line in response.iter_lines():
                delta = reader.feed_line(line)
                if delta:
                    yield delta
        finally:
            response.close()
        yield reader.finish()

    async def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        response = await self._asend(request_body(request, self.model, stream=True))
        reader = _StreamReader()
        try:
            async for line in response.aiter_lines():
                delta = reader.feed_line(line)
                if delta:
                    yield delta
        finally:
            await response.aclose()
        yield reader.finish()

    def complete(self, request: ChatRequest) -> dict[str, Any]:
        response = self._send(request_body(request, self.model, stream=False))
        try:
            return _completion(json.loads(response.read()))
        finally:
            response.close()

    async def acomplete(self, request: ChatRequest) -> dict[str, Any]:
        response = await self._asend(request_body(request, self.model, stream=False))
        try:
            return _completion(json.loads(await response.aread()))
        finally:
            await response.aclose()

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        return self._json(tokenize_body(request, self.model), f"{self.root_url}/tokenize")["tokens"]

    def text_ids(self, text: str) -> list[int]:
        body = {"model": self.model, "prompt": text, "add_special_tokens": False}
        return self._json(body, f"{self.root_url}/tokenize")["tokens"]

    def context_length(self) -> int | None:
        """The served model's context window (`max_model_len` of /v1/models), None when not given."""
        cards = self._json(None, "/models").get("data") or ()
        lengths = [card.get("max_model_len") for card in cards if card.get("id") == self.model]
        return lengths[0] if lengths and isinstance(lengths[0], int) else None


class _StreamReader:
    """Server-sent events of one streamed completion to runtime deltas.

    The chunk with `finish_reason` is held back: OpenAI servers send usage in a later chunk,
    and the runtime's last delta carries both.
    """

    def __init__(self) -> None:
        self.data: list[str] = []
        self.final: dict[str, Any] | None = None
        self.usage: Mapping[str, Any] | None = None
        self.done = False

    def feed_line(self, line: str) -> dict[str, Any] | None:
        """One SSE line; returns a delta when an event completes with visible output."""
        if line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
            return None
        if line or not self.data:  # another field, a comment, or a blank line between events
            return None
        payload, self.data = "\n".join(self.data), []
        if payload == "[DONE]":
            self.done = True
            return None
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError as exc:
            raise ServerError(f"the server sent an event that is not JSON: {payload[:200]!r}") from exc
        return self._chunk(chunk)

    def _chunk(self, chunk: Mapping[str, Any]) -> dict[str, Any] | None:
        if "error" in chunk:
            raise _error_from_body(500, chunk)
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        delta: dict[str, Any] = {}
        for choice in chunk.get("choices") or ():
            delta = runtime_delta(choice.get("delta") or {})
            if choice.get("finish_reason"):
                self.final = _final(delta, choice, None)
                return None
        return delta or None

    def finish(self) -> dict[str, Any]:
        if self.data:  # a last event without its blank line
            self.feed_line("")
        if self.final is None:
            raise ServerError("the server ended the stream without a finish_reason (it may have failed mid-answer).")
        self.final["usage"] = runtime_usage(self.usage)
        return self.final


def _final(delta: dict[str, Any], choice: Mapping[str, Any], usage: Mapping[str, Any] | None) -> dict[str, Any]:
    delta.update(
        finish_reason=choice["finish_reason"],
        usage=runtime_usage(usage),
        speculative=dict(choice.get("speculative_decoding_stats") or {}),
    )
    return delta


def _completion(body: Mapping[str, Any]) -> dict[str, Any]:
    """A non-streamed answer as the runtime's `Completion.message`."""
    choices = body.get("choices") or ()
    if not choices:
        raise ServerError(f"the server answered without choices: {json.dumps(body)[:200]}")
    choice = choices[0]
    completion = Completion()
    completion.add(_final(runtime_delta(choice.get("message") or {}), choice, body.get("usage")))
    return completion.message


def _retry(response: httpx.Response, attempt: int, max_retries: int) -> bool:
    return response.status_code in RETRY_STATUSES and attempt < max_retries


def _delay(response: httpx.Response | None, attempt: int) -> float:
    """Seconds before the next attempt: the answer's Retry-After if it has one, else exponential
    backoff; either grown by up to JITTER at random."""
    wait = _retry_after(response) if response is not None else None
    if wait is None:
        wait = min(0.5 * 2**attempt, 8.0)
    return wait * (1.0 + random.uniform(0.0, JITTER))


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date), at most MAX_RETRY_AFTER_S; None when absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = (when.replace(tzinfo=when.tzinfo or UTC) - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _unreachable(base_url: str, exc: Exception) -> ServerError:
    return ServerError(f"cannot reach the server at {base_url} ({type(exc).__name__}: {exc}): is it running? Check base_url.")


def _error_of(response: httpx.Response) -> Exception:
    try:
        body = response.json()
    except ValueError:
        body = {"error": {"message": response.text[:500] or response.reason_phrase}}
    return _error_from_body(response.status_code, body)


def _error_from_body(status: int, body: Any) -> Exception:
    error = body.get("error", body) if isinstance(body, Mapping) else None  # some servers put it at the top level
    if not isinstance(error, Mapping) or "message" not in error:
        error = {"message": json.dumps(body)[:500]}
    code = error.get("code")
    message = f"the server answered {status}: {error['message']}"
    return error_for_status(status, message, code if isinstance(code, str) else None)
