"""The OpenAI-compatible Starlette app: a thin HTTP layer over one ChatRuntime.

Routes: `POST /v1/chat/completions` (stream and non-stream), `GET /v1/models`, `GET /health`,
`GET /metrics`, and as in vLLM `POST /tokenize` (a chat's prompt as the model sees it, or plain
text), `POST /detokenize` and `GET /version`. Every request is checked (API key, body size, JSON
depth and text, schema, model name, max_tokens cap, then the runtime's own checks while it
renders the prompt, the engine's KV-cache budget last) before any model work; a failed check is
an OpenAI-style error body `{"error": {"message", "type", "param", "code"}}` with the status of
`errors.HTTP_ERRORS`, and the server goes on serving. At most `max_concurrent` requests run and
`max_queued` wait for a slot; one more is answered 429 with `Retry-After` at once. A client that
goes away cancels its generation at the engine's next verification step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .. import __version__
from ..errors import (
    AuthenticationError,
    GemmaMTPError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
    ServerBusyError,
    http_error,
)
from ..runtime import ChatRuntime, Completion
from ..wire import ChatCompletionBody, DetokenizeBody, TokenizeBody, wire_delta
from .limits import RETRY_AFTER_S, Admission, read_json_object
from .metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)
_Body = TypeVar("_Body", bound=BaseModel)


@dataclass
class ServerSettings:
    """What a server serves and the limits it enforces."""

    served_model_name: str
    api_key: str | None = None
    max_tokens_limit: int = 8192
    """Largest max_tokens a request may ask for; also the default when it asks for none."""
    max_body_bytes: int = 4 * 1024 * 1024
    max_concurrent: int = 16
    """Requests generating at once (the engine steps them in turns; its KV budget may hold some back)."""
    max_queued: int = 64
    """Requests waiting for one of the max_concurrent slots; one more is answered 429 at once."""


class _ClientGone(Exception):
    """The client disconnected before a non-streamed answer was ready."""


class ChatServer:
    """Handlers of one app over one runtime."""

    def __init__(self, runtime: ChatRuntime, settings: ServerSettings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.admission = Admission(settings.max_concurrent, settings.max_queued)
        self.metrics = ServerMetrics(runtime.engine, self.admission)
        self.created = int(time.time())

    # -- checks before any model work -----------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header[:7].lower() == "bearer " else ""
        # Constant-time comparison: response time must not tell how much of a guess was right.
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise AuthenticationError("missing or wrong API key: send the header `Authorization: Bearer <key>`.")

    async def _json(self, request: Request) -> dict[str, Any]:
        """The request body as a JSON object, read up to the size limit."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_large = RequestTooLargeError(
            f"the request body is over this server's limit of {limit} bytes: send less (or raise --max-body-bytes)."
        )
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > limit:
                raise too_large
        return read_json_object(bytes(raw))

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            served = self.settings.served_model_name
            raise _at(ModelNotFoundError(f"the model {model!r} does not exist here: this server serves {served!r}."), "model")

    async def _body(self, request: Request) -> ChatCompletionBody:
        body = _validated(ChatCompletionBody, await self._json(request))
        self._check_model(body.model)
        asked = body.requested_max_tokens
        if asked is not None and asked > self.settings.max_tokens_limit:
            param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            cap = self.settings.max_tokens_limit
            raise _at(InvalidRequestError(f"{param}={asked} is over this server's cap of {cap}: ask for fewer tokens."), param)
        return body

    # -- routes ---------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        """The answer, sent while the request holds its admission slot (given back however it ends)."""
        arrived = time.perf_counter()
        try:
            self._authorize(request)
            body = await self._body(request)
            await self.admission.enter()
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            self.metrics.cancelled.inc()
            return Response(status_code=499)
        except Exception as exc:
            return self.error(exc)
        try:
            response = await self._answer(request, body, arrived)
        except BaseException:
            self.admission.leave()
            raise
        return _Releasing(response, self.admission.leave)

    async def _answer(self, request: Request, body: ChatCompletionBody, arrived: float) -> Response:
        try:
            deltas = self.runtime.astream(body.to_request(self.settings.max_tokens_limit))
            # The runtime renders and checks the request on its first step: a bad one fails
            # here, before the 200 goes out, and the first delta is the first verified output.
            first = await anext(deltas)
        except Exception as exc:
            return self.error(exc)
        self.metrics.first_chunk.observe(time.perf_counter() - arrived)
        reply = _Reply(self.settings.served_model_name, include_usage=bool(body.stream_options and body.stream_options.include_usage))
        if body.stream:
            events = self._events(reply, first, deltas)
            # Starlette cancels the stream when the client disconnects; closing the generators
            # afterwards cancels the engine request at its next step.
            return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(events.aclose))
        try:
            completion = await _unless_disconnected(request, self._collect(first, deltas))
        except _ClientGone:
            self.metrics.cancelled.inc()
            return Response(status_code=499)
        except Exception as exc:
            return self.error(exc)
        return JSONResponse(reply.completion(completion))

    async def _collect(self, first: dict[str, Any], deltas: AsyncGenerator[dict[str, Any], None]) -> dict[str, Any]:
        completion = Completion()
        completion.add(first)
        self.metrics.running.inc()
        try:
            async for delta in deltas:
                completion.add(delta)
        finally:
            self.metrics.running.dec()
            await deltas.aclose()
        self.metrics.finish(completion.message)
        return completion.message

    async def _events(
        self, reply: _Reply, first: dict[str, Any], deltas: AsyncGenerator[dict[str, Any], None]
    ) -> AsyncGenerator[str, None]:
        finished = False
        self.metrics.running.inc()
        try:
            delta = first
            while True:
                yield reply.event(delta)
                if "finish_reason" in delta:
                    finished = True
                    self.metrics.finish(delta)
                    if reply.include_usage:
                        yield reply.usage_event(delta["usage"])
                    break
                delta = await anext(deltas)
        except Exception as exc:  # the model failed mid-answer: the client gets the error as an event
            log.exception("generation failed mid-stream")
            finished = True
            self.metrics.failed.labels(str(http_error(exc)[0])).inc()
            yield f"data: {json.dumps(_error_body(exc))}\n\n"
        finally:
            self.metrics.running.dec()
            if not finished:
                self.metrics.cancelled.inc()
            await deltas.aclose()
        yield "data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except AuthenticationError as exc:
            return self.error(exc)
        card = {
            "id": self.settings.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "gemma-mtp",
            "max_model_len": self.runtime.engine.max_positions,
        }
        return JSONResponse({"object": "list", "data": [card]})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.settings.served_model_name})

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: the token ids of a chat's prompt (the chat request's own rendering) or of text."""
        try:
            self._authorize(request)
            body = _validated(TokenizeBody, await self._json(request))
            self._check_model(body.model)
            if body.prompt is not None:
                ids = self.runtime.encode_text(body.prompt, add_special_tokens=body.add_special_tokens)
            else:
                ids = (await asyncio.to_thread(self.runtime.prepare, body.to_request())).prompt_ids  # off the loop, as in astream
        except Exception as exc:
            return self.error(exc)
        answer: dict[str, Any] = {"count": len(ids), "max_model_len": self.runtime.engine.max_positions, "tokens": ids}
        if body.return_token_strs:
            answer["token_strs"] = self.runtime.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(answer)

    async def detokenize(self, request: Request) -> Response:
        """vLLM's /detokenize: the text of token ids."""
        try:
            self._authorize(request)
            body = _validated(DetokenizeBody, await self._json(request))
            self._check_model(body.model)
            vocab = len(self.runtime.tokenizer)
            bad = [t for t in body.tokens if not 0 <= t < vocab]
            if bad:
                raise _at(InvalidRequestError(f"token ids {bad[:5]} are outside this model's vocabulary of {vocab}."), "tokens")
        except Exception as exc:
            return self.error(exc)
        return JSONResponse({"prompt": self.runtime.tokenizer.decode(body.tokens)})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # -- errors ---------------------------------------------------------------------------------

    def error(self, exc: BaseException) -> JSONResponse:
        status = http_error(exc)[0]
        if status >= 500:
            log.exception("request failed", exc_info=exc)
        self.metrics.failed.labels(str(status)).inc()
        headers = {"retry-after": str(RETRY_AFTER_S)} if isinstance(exc, ServerBusyError) else None
        return JSONResponse(_error_body(exc), status_code=status, headers=headers)


class _Releasing(Response):
    """A response that calls `release` once it has been sent, or failed to be (client gone, cancelled)."""

    def __init__(self, inner: Response, release: Callable[[], None]) -> None:
        self.inner = inner
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.inner(scope, receive, send)
        finally:
            self.release()


def _at(error: GemmaMTPError, param: str | None) -> GemmaMTPError:
    """The error, naming the request field at fault (OpenAI's `param`)."""
    error.param = param  # type: ignore[attr-defined]  # a server-side tag, read back with getattr
    return error


def _validated(model: type[_Body], data: dict[str, Any]) -> _Body:
    """`data` read as `model`; the first problem is an InvalidRequestError naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"])
        where = f"field {param!r}" if param else "body"
        raise _at(InvalidRequestError(f"invalid request {where}: {first['msg']}."), param or None) from exc


def _error_body(exc: BaseException) -> dict[str, Any]:
    status, kind, code = http_error(exc)
    message = str(exc) if status < 500 else f"the server failed this request: {type(exc).__name__}: {exc}"
    return {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None), "code": code}}


class _Reply:
    """OpenAI response objects for one request: chunks, events and the whole completion."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.sent_role = False

    def _object(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def event(self, delta: dict[str, Any]) -> str:
        wire = wire_delta(delta)
        if not self.sent_role:
            wire = {"role": "assistant", **wire}
            self.sent_role = True
        choice: dict[str, Any] = {"index": 0, "delta": wire, "logprobs": None, "finish_reason": delta.get("finish_reason")}
        if "speculative" in delta:
            choice["speculative_decoding_stats"] = delta["speculative"]
        chunk = self._object("chat.completion.chunk", [choice])
        if self.include_usage:
            chunk["usage"] = None
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def usage_event(self, usage: dict[str, Any]) -> str:
        chunk = self._object("chat.completion.chunk", [])
        chunk["usage"] = usage
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def completion(self, message: dict[str, Any]) -> dict[str, Any]:
        wire = wire_delta(message)
        body = {"role": "assistant", "content": wire.get("content", None if wire.get("tool_calls") else "")}
        body.update({key: value for key, value in wire.items() if key != "content"})
        choice = {
            "index": 0,
            "message": body,
            "logprobs": None,
            "finish_reason": message["finish_reason"],
            "speculative_decoding_stats": message["speculative"],
        }
        result = self._object("chat.completion", [choice])
        result["usage"] = message["usage"]
        return result


async def _unless_disconnected(request: Request, work: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The result of `work`, or _ClientGone as soon as the client disconnects (work is cancelled)."""
    result: list[dict[str, Any]] = []
    failed: list[Exception] = []
    gone = False

    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                result.append(await work)
            except Exception as exc:  # raised below, not as an ExceptionGroup of the task group
                failed.append(exc)
            group.cancel_scope.cancel()

        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if failed:
        raise failed[0]
    if gone or not result:
        raise _ClientGone
    return result[0]


def create_app(runtime: ChatRuntime, settings: ServerSettings) -> Starlette:
    """The ASGI app serving `runtime` under `settings.served_model_name`."""
    server = ChatServer(runtime, settings)

    async def http_error_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}. This server has POST /v1/chat/completions, GET /v1/models, /health, /metrics, /version, POST /tokenize and /detokenize (a base_url ends in /v1)."
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code)

    async def unexpected(request: Request, exc: Exception) -> Response:
        return server.error(exc)

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics_page, methods=["GET"]),
            Route("/tokenize", server.tokenize, methods=["POST"]),
            Route("/detokenize", server.detokenize, methods=["POST"]),
            Route("/version", server.version, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error_body, Exception: unexpected},
    )
    app.state.server = server
    return app
