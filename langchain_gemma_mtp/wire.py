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
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .hints import DraftHint, check_draft_hint
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


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")

# Fields of OpenAI's or vLLM's chat-completions request that this server does not honour, each
# with the values that change nothing (null always does): any other value is rejected with a 400
# naming the field, never silently dropped.
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "prompt_logprobs": (),
    "logprob_token_ids": (),
    "best_of": (1,),
    "use_beam_search": (False,),
    "length_penalty": (1, 1.0),
    "allowed_token_ids": (),
    "bad_words": ([],),
    "structured_outputs": (),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "structural_tag": (),
    "thinking_token_budget": (),
    "include_reasoning": (True,),
    "include_stop_str_in_output": (False,),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "echo": (False,),
    "add_generation_prompt": (True,),
    "continue_final_message": (False,),
    "add_special_tokens": (False,),
    "documents": (),
    "chat_template": (),
    "media_io_kwargs": (),
    "mm_processor_kwargs": (),
    "truncate_prompt_tokens": (),
    "truncation_side": (),
    "watermarking": (False,),
    "repetition_detection": (),
    "logits_processors": (),
    "vllm_xargs": (),
    "priority": (0,),
    "cache_salt": (),
    "kv_transfer_params": (),
    "ec_transfer_params": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "return_prompt_text": (False,),
    "stream_interval": (),
    "prediction": (),
    "audio": (),
    "modalities": (["text"],),
    "web_search_options": (),
    "verbosity": (),
    "functions": (),
    "function_call": (),
}

# Fields that change nothing in the answer (bookkeeping, caching hints, render-only options):
# accepted and ignored, from this list only.
NO_OPS = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
    "request_id",
    "session_id",
    "routed_experts_prompt_start",
    "return_token_offsets",
    "return_mm_kwargs",
)


def _neutral(value: Any, allowed: tuple[Any, ...]) -> bool:
    """Whether `value` is null or one of `allowed` (True is not 1 here)."""
    return value is None or any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in allowed)


class _Refusing(BaseModel):
    """Refuses unknown fields, and the unhonoured ones at values that would change the answer."""

    model_config = ConfigDict(extra="forbid")

    @field_validator(*UNHONOURED, mode="after", check_fields=False)
    @classmethod
    def _refuse(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None  # a field validator always runs for a field
        if not _neutral(value, UNHONOURED[info.field_name]):
            raise PydanticCustomError(
                "unsupported_field",
                "{field}={value} is not honoured by this server: leave it out (or send its default)",
                {"field": info.field_name, "value": json.dumps(value)[:80]},
            )
        return value


# The fields themselves, any type: only their values are checked.
if TYPE_CHECKING:  # built at run time; a type checker sees its base
    _OtherServersFields = _Refusing
else:
    _OtherServersFields = create_model("_OtherServersFields", __base__=_Refusing, **{name: (Any, None) for name in (*UNHONOURED, *NO_OPS)})


class ChatCompletionBody(_OtherServersFields):
    """A `POST /v1/chat/completions` body: the OpenAI and vLLM fields this server honours, plus extensions.

    Every other field OpenAI or vLLM define is rejected (400, naming it) unless its value changes
    nothing (`UNHONOURED`), or ignored when it never changes the answer (`NO_OPS`); an unknown
    field is rejected too, so a typo never passes unnoticed.
    """

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
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: StrictBool = False
    seed: int | None = None
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None  # type: ignore[valid-type]
    chat_template_kwargs: dict[str, Any] | None = None
    speculative: SpeculativeOptions | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.strip().lstrip("-").isdigit():
                raise PydanticCustomError("token_id", "keys must be token ids (integers as strings), got {key}", {"key": json.dumps(key)})
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _known_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        unknown = sorted(set(value or {}) - {"enable_thinking"})
        if unknown:
            raise PydanticCustomError(
                "unsupported_field", "only enable_thinking is honoured here, not {keys}", {"keys": ", ".join(unknown)}
            )
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def thinking(self) -> bool:
        """chat_template_kwargs.enable_thinking when given, else reasoning_effort: "none" turns
        thinking off and every other effort on (as vLLM does for Gemma 4); off by default."""
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            return bool(kwargs["enable_thinking"])
        return self.reasoning_effort is not None and self.reasoning_effort != "none"

    def to_request(self, default_max_tokens: int) -> ChatRequest:
        spec = self.speculative or SpeculativeOptions()
        return ChatRequest(
            messages=self.messages,
            tools=self.tools,
            tool_choice=self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls,
            response_format=self.response_format,
            reasoning=self.thinking,
            max_tokens=self.requested_max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,  # OpenAI's default
            top_p=self.top_p,
            top_k=self.top_k if self.top_k != -1 else 0,  # vLLM's -1 also disables it
            min_p=self.min_p or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            draft_hint=cast(DraftHint, spec.draft_hint),  # checked by SpeculativeOptions._known_hint
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
        # Sampling extensions (vLLM's names), sent only when set, so OpenAI's own API still accepts the body.
        "min_p": request.min_p or None,
        "frequency_penalty": request.frequency_penalty or None,
        "presence_penalty": request.presence_penalty or None,
        "repetition_penalty": request.repetition_penalty if request.repetition_penalty != 1.0 else None,
        "logit_bias": {str(k): v for k, v in request.logit_bias.items()} if request.logit_bias else None,
        "min_tokens": request.min_tokens or None,
        "stop_token_ids": list(request.stop_token_ids) or None,
        "ignore_eos": request.ignore_eos or None,
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
        {
            "index": bad["index"],
            "id": bad["id"],
            "type": "function",
            "function": {"name": bad["name"], "arguments": bad["raw"]},
            "error": bad["error"],
        }
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
            invalid.append(
                {
                    "index": index,
                    "id": call.get("id"),
                    "name": function.get("name"),
                    "raw": function.get("arguments") or "",
                    "error": call["error"],
                }
            )
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
