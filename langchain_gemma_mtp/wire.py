"""The OpenAI chat-completions wire format: request bodies ⇄ `ChatRequest`, runtime deltas ⇄ JSON.

The server reads bodies with `ChatCompletionBody.to_request` and writes what ChatRuntime yields
with `wire_delta`; the HTTP backend writes bodies with `request_body` and reads chunks back with
`runtime_delta`, so a request and its deltas cross HTTP unchanged. Both directions live here.

Extensions, ignored by other OpenAI-compatible servers and clients:

- request `speculative: {"draft_hint", "num_draft_tokens"}`: the per-call draft length;
  `top_k`; `chat_template_kwargs: {"enable_thinking": true}` turns reasoning on (as in vLLM).
- response, per choice (on the final chunk when streaming) `speculative_decoding_stats`: the
  runtime's speculative stats (drafted, accepted, acceptance_rate, mean_accepted_length,
  per_position_acceptance, ...).
- a tool call that cannot be used is sent as a tool call whose `arguments` is the raw text the
  model wrote, plus `"error"`: the reason. OpenAI clients see an unusable call (LangChain's
  ChatOpenAI makes it an invalid tool call); our backend restores the runtime's invalid call.
- `reasoning_content` in messages and deltas carries the thought channel (as vLLM and DeepSeek do;
  `reasoning` is read too).
- `burst_sizes` in deltas: the tokens of each burst verified since the previous delta.

`POST /tokenize` and `/detokenize` take vLLM's bodies (`TokenizeBody`, `DetokenizeBody`); the
HTTP backend writes the chat form with `tokenize_body`, the prompt-shaping fields of a chat body.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from .hints import check_draft_hint
from .runtime import ChatRequest


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class SpeculativeOptions(BaseModel):
    """The `speculative` extension of a request."""

    model_config = ConfigDict(extra="forbid")

    draft_hint: str | int = "auto"
    num_draft_tokens: int | None = Field(default=None, ge=0, le=16)

    @field_validator("draft_hint")
    @classmethod
    def _known_hint(cls, value: str | int) -> str | int:
        check_draft_hint(value)
        return value


class ChatCompletionBody(BaseModel):
    """A `POST /v1/chat/completions` body: the OpenAI fields this server honours, plus extensions.

    Fields OpenAI clients send that change nothing here (user, metadata, store, ...) are ignored;
    fields that would change the answer in ways this server cannot honour are rejected.
    """

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    seed: int | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    speculative: SpeculativeOptions | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def to_request(self, default_max_tokens: int) -> ChatRequest:
        spec = self.speculative or SpeculativeOptions()
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking", False)
        return ChatRequest(
            messages=self.messages,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format,
            reasoning=bool(thinking),
            max_tokens=self.requested_max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI's default
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            draft_hint=spec.draft_hint,
            num_draft_tokens=spec.num_draft_tokens,
        )


def request_body(request: ChatRequest, model: str, *, stream: bool) -> dict[str, Any]:
    """The JSON body for a request; options left at their defaults are not sent, so any
    OpenAI-compatible server accepts it."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [_wire_message(m) for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    optional = {
        "tools": request.tools or None,
        "tool_choice": request.tool_choice,
        "parallel_tool_calls": request.parallel_tool_calls,
        "response_format": request.response_format,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "seed": request.seed,
        "stop": list(request.stop) or None,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if request.reasoning:
        body["chat_template_kwargs"] = {"enable_thinking": True}
    if request.draft_hint != "auto" or request.num_draft_tokens is not None:
        body["speculative"] = {"draft_hint": request.draft_hint, "num_draft_tokens": request.num_draft_tokens}
    return body


# The fields of a chat body that shape the prompt: what /tokenize needs to count it as the model sees it.
_PROMPT_FIELDS = ("model", "messages", "tools", "tool_choice", "response_format", "chat_template_kwargs")


def tokenize_body(request: ChatRequest, model: str) -> dict[str, Any]:
    """The `POST /tokenize` body (chat form) for a request: its prompt, without generation options."""
    body = request_body(request, model, stream=False)
    return {key: body[key] for key in _PROMPT_FIELDS if key in body}


class TokenizeBody(BaseModel):
    """A `POST /tokenize` body, in vLLM's shapes: `prompt` (plain text) or `messages` (with `tools`,
    rendered by the chat template exactly as a chat request's prompt is)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: Literal[True] = True  # the prompt a chat request is answered from always has it
    add_special_tokens: StrictBool = True  # prompt form only (vLLM's default); the chat form's template writes them
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt (plain text) or messages (a chat), not both or neither")
        return self

    def to_request(self) -> ChatRequest:
        """The chat request whose prompt this body asks for (chat form)."""
        thinking = (self.chat_template_kwargs or {}).get("enable_thinking", False)
        return ChatRequest(
            messages=self.messages or [],
            tools=self.tools,
            tool_choice=self.tool_choice,
            response_format=self.response_format,
            reasoning=bool(thinking),
        )


class DetokenizeBody(BaseModel):
    """A `POST /detokenize` body (vLLM's shape)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[StrictInt]


def _wire_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as OpenAI sends it: tool-call arguments as JSON text (LangChain keeps dicts)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    sent = []
    for call in calls:
        function = dict(call["function"])
        if not isinstance(function.get("arguments"), str):
            function["arguments"] = json.dumps(function.get("arguments") or {}, ensure_ascii=False)
        sent.append({**call, "function": function})
    return {**message, "tool_calls": sent}


def wire_delta(delta: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI delta (or message fields) for a runtime delta, without its final fields."""
    wire: dict[str, Any] = {}
    if delta.get("content"):
        wire["content"] = delta["content"]
    if delta.get("reasoning"):
        wire["reasoning_content"] = delta["reasoning"]
    if delta.get("burst_sizes"):
        wire["burst_sizes"] = list(delta["burst_sizes"])
    calls = [dict(call) for call in delta.get("tool_calls", ())]
    calls += [
        {"index": bad["index"], "id": bad["id"], "type": "function", "function": {"name": bad["name"], "arguments": bad["raw"]}, "error": bad["error"]}
        for bad in delta.get("invalid_tool_calls", ())
    ]
    if calls:
        wire["tool_calls"] = sorted(calls, key=lambda call: call["index"])
    return wire


def runtime_delta(wire: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime delta for an OpenAI delta or message (final fields are the caller's)."""
    delta: dict[str, Any] = {}
    if wire.get("content"):
        delta["content"] = wire["content"]
    reasoning = wire.get("reasoning_content") or wire.get("reasoning")
    if reasoning:
        delta["reasoning"] = reasoning
    if wire.get("burst_sizes"):
        delta["burst_sizes"] = list(wire["burst_sizes"])
    calls, invalid = [], []
    for position, call in enumerate(wire.get("tool_calls") or ()):
        function = call.get("function") or {}
        index = call.get("index", position)  # a whole message's calls carry no index
        if call.get("error") is not None:
            invalid.append({"index": index, "id": call.get("id"), "name": function.get("name"), "raw": function.get("arguments") or "", "error": call["error"]})
        else:
            piece = {"name": function.get("name"), "arguments": function.get("arguments") or ""}
            calls.append({"index": index, "id": call.get("id"), "type": "function", "function": piece})
    if calls:
        delta["tool_calls"] = calls
    if invalid:
        delta["invalid_tool_calls"] = invalid
    return delta


def runtime_usage(usage: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Usage as the runtime shapes it (servers may leave out the details)."""
    if not usage:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    details = usage.get("prompt_tokens_details") or {}
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
        "prompt_tokens_details": {"cached_tokens": int(details.get("cached_tokens") or 0)},
    }
