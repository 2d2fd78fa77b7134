"""Typed errors of langchain-gemma-mtp: each names the problem and the fix."""

from __future__ import annotations


class GemmaMTPError(Exception):
    """Base class of every error this package raises on purpose."""


class EmulatedDtypeWarning(UserWarning):
    """A half-precision dtype was asked for on a CPU that computes it only by emulation (slower than float32)."""


class InvalidRequestError(GemmaMTPError, ValueError):
    """A generation request is malformed; raised before any forward pass."""


class ModelNotFoundError(GemmaMTPError, FileNotFoundError):
    """A model or drafter checkpoint could not be found locally or on the hub."""


class IncompatibleDrafterError(GemmaMTPError, ValueError):
    """The drafter cannot serve this target (vocabulary, hidden size, heads or rope differ)."""


class MissingDependencyError(GemmaMTPError, ImportError):
    """Running the model in this process needs the `local` extra (torch, transformers), which is not installed."""


class ModelLoadError(GemmaMTPError, RuntimeError):
    """A checkpoint was found but could not be loaded correctly."""


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit in the model's context window."""


class UnsupportedContentError(InvalidRequestError):
    """A message holds content this model path cannot read (images, audio, files on a text-only model)."""


class ToolSchemaError(InvalidRequestError):
    """A tool definition cannot be used: not JSON-serializable, or without a name."""


class GrammarError(InvalidRequestError):
    """A schema (tool parameters, response_format) or grammar cannot constrain decoding: a JSON-schema
    feature the grammar cannot enforce, one llguidance refuses, or text the vocabulary cannot write."""


class DistillError(GemmaMTPError, ValueError):
    """Distillation options or data cannot make a drafter for this target; raised before training."""


class AuthenticationError(GemmaMTPError):
    """The server wants an API key and the request had none or a wrong one."""


class RequestTooLargeError(InvalidRequestError):
    """A request body is larger than the server accepts."""


class KVCacheLimitError(InvalidRequestError):
    """A request's KV cache (prompt + max_tokens) could never fit in the engine's KV-cache budget."""


class ServerError(GemmaMTPError, RuntimeError):
    """A server failed a request on its side (5xx), or broke the protocol."""


class ServerBusyError(ServerError):
    """The server already runs and queues as many requests as it takes: retry after `Retry-After` seconds."""


# HTTP status, OpenAI error type and code of each error, most specific class first: the server
# answers with them and the HTTP backend raises the class back, so one table rules both ways.
HTTP_ERRORS: tuple[tuple[type[GemmaMTPError], int, str, str | None], ...] = (
    (AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    (ModelNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large"),
    (ContextLengthError, 400, "invalid_request_error", "context_length_exceeded"),
    (KVCacheLimitError, 400, "invalid_request_error", "kv_cache_limit_exceeded"),
    (GrammarError, 400, "invalid_request_error", "invalid_schema"),
    (ServerBusyError, 429, "rate_limit_error", "server_busy"),
    (InvalidRequestError, 400, "invalid_request_error", None),
    (ServerError, 500, "server_error", None),
)


def http_error(error: BaseException) -> tuple[int, str, str | None]:
    """(status, type, code) for an error; anything unexpected is a 500 server error."""
    for cls, status, kind, code in HTTP_ERRORS:
        if isinstance(error, cls):
            return status, kind, code
    return 500, "server_error", None


def error_for_status(status: int, message: str, code: str | None = None) -> GemmaMTPError:
    """The typed error for an HTTP error answer: by its code when known, else the most general
    class with its status (4xx: InvalidRequestError, 5xx, 408 and 429: ServerError by default)."""
    by_code = [cls for cls, _, _, known in HTTP_ERRORS if code is not None and known == code]
    by_status = [cls for cls, known, _, _ in HTTP_ERRORS if known == status]
    # 408 and 429 are the server's state, not the request's fault: they stay server errors.
    default = InvalidRequestError if 400 <= status < 500 and status not in (408, 429) else ServerError
    return (by_code or by_status[-1:] or [default])[0](message)
