"""ChatGemmaMTP: the LangChain chat model over a local Gemma with lossless speculative decoding.

The class only converts: LangChain messages and call options become a `ChatRequest`, the backend
(`backends.py`) runs it, and its OpenAI-style deltas become `AIMessageChunk`s (one per verified
burst that adds output). It holds no model state: engines live in a process-wide registry and
load on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from operator import itemgetter
from typing import Any, Literal, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import BaseChatModel, LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.output_parsers import (
    JsonOutputKeyToolsParser,
    JsonOutputParser,
    PydanticOutputParser,
    PydanticToolsParser,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from .backends import Backend, context_length, in_process_backend, require_local_packages
from .draft_settings import MAX_DRAFT_TOKENS, DrafterName, mtp_settings
from .engine_spec import check_load_options
from .errors import InvalidRequestError
from .hints import DraftHint, check_draft_hint
from .http_backend import HTTPBackend
from .messages import convert_tools, from_langchain, normalize_tool_choice
from .runtime import ChatRequest

DEFAULT_MODEL = "google/gemma-4-E2B-it"
PROVIDER = "gemma_mtp"
BASE_URL_ENV = "GEMMA_MTP_BASE_URL"
API_KEY_ENV = "GEMMA_MTP_API_KEY"
PROFILE_PROBE_TIMEOUT_S = 2.0  # how long construction waits for a server's /v1/models (the profile's context size)

# What every Gemma the class runs can do, for LangChain's model profile. Tool and structured-output
# choices: `tool_choice` is enforced (the prompt ends with the opening of the call, and a grammar
# holds the rest to the call syntax). A response_format is grammar-constrained too, but
# `structured_output` stays False so create_agent keeps ToolStrategy (a forced call of the
# schema's tool), the path a vLLM server without guided decoding follows the same way.
_PROFILE: ModelProfile = {
    "open_weights": True,
    "text_inputs": True,
    "image_inputs": False,
    "image_url_inputs": False,
    "pdf_inputs": False,
    "audio_inputs": False,
    "video_inputs": False,
    "text_outputs": True,
    "image_outputs": False,
    "audio_outputs": False,
    "video_outputs": False,
    "reasoning_output": True,
    "tool_calling": True,
    "tool_choice": True,
    "tool_call_streaming": True,
    "structured_output": False,
    "temperature": True,
}

# Logits processors and stop ids (the engine's names), as fields and per-call options.
_SAMPLING_FIELDS = (
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "ignore_eos",
)
# Options a call may pass (invoke kwargs, `.bind`, `bind_tools`, create_agent model settings).
_CALL_OPTIONS = frozenset(
    {
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "reasoning",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "draft_hint",
        "num_draft_tokens",
        "model",
    }
) | frozenset(_SAMPLING_FIELDS)
_PER_CALL_FIELDS = ("temperature", "max_tokens", "top_p", "top_k", "seed", "draft_hint", "num_draft_tokens", "reasoning", *_SAMPLING_FIELDS)


class ChatGemmaMTP(BaseChatModel):
    """Local Gemma with lossless speculative decoding, as a LangChain chat model.

    .. code-block:: python

        llm = ChatGemmaMTP(model="google/gemma-4-E2B-it")        # pairs with ...-it-assistant (MTP)
        llm.invoke("Hello")
        llm.invoke(msgs, draft_hint="code")                       # per call
        coder = llm.bind_tools(tools).bind(draft_hint="code")     # per LangGraph node
        for chunk in llm.stream(msgs): ...                        # one chunk per verified burst

    Construction loads nothing: the weights load on first use and are shared by every instance
    with the same (model, drafter, assistant_model, device, dtype). Pass `engine=` to use an Engine
    you built yourself, or `base_url=` to run on an OpenAI-compatible server instead
    (`gemma-mtp serve`, vLLM): `model` is then the served model name, and the same calls, hints,
    tools and metadata work over HTTP.

    Draft hints: `draft_hint` ("auto", a kind of `draft_settings.HINT_KINDS`, or an int 0..MAX_DRAFT_TOKENS)
    and `num_draft_tokens` set the draft length per call; see `langchain_gemma_mtp.hints` for how
    each maps to a length. A call takes them from its kwargs (invoke, `.bind`, `bind_tools`,
    create_agent model settings), else from `configurable["draft_hint"]` of its RunnableConfig,
    else from this instance.

    Output: text as `content`; the thought channel (with `reasoning=True`) as reasoning content
    (`additional_kwargs["reasoning_content"]`, a `reasoning` block in `content_blocks`); tool calls
    as `tool_call_chunks` while streaming and `tool_calls` on the message. A call that does not
    parse or names an undeclared tool becomes an `invalid_tool_calls` entry carrying the raw text
    and the reason; while streaming, LangChain rebuilds invalid calls from the chunks without
    their reason, so the reasons also come on the last chunk as
    `response_metadata["invalid_tool_call_errors"]` ({call id: reason}).

    Token counts (`get_num_tokens_from_messages`, `get_num_tokens`, `get_token_ids`, so
    `trim_messages(token_counter=llm)`) use the model's own tokenizer and chat template, tools
    included: in process through the runtime, over HTTP through the server's `/tokenize`. `profile`
    tells LangChain the context size (`max_input_tokens`, read from the model's config.json, the
    engine, or the server's /v1/models) and what the model can do.

    Each streamed chunk carries `additional_kwargs["burst_sizes"]`: the size in tokens of each
    burst verified since the previous chunk (one, or several when text was held back). Callbacks
    read it there; lists concatenate when chunks merge, so a merged stream lists every burst.

    The last chunk carries `usage_metadata` and `response_metadata` (`model_name`,
    `model_provider`, `finish_reason`, `speculative` = drafter, draft_hint, num_draft_tokens,
    drafted, accepted, acceptance_rate, mean_accepted_length, per_position_acceptance, draft_lengths,
    verify_widths, step_costs (the engine's fitted costs, `CostModel.snapshot`), target_forwards,
    tokens_per_second, and jump_forward_tokens / jump_forward_accepted: drafts a grammar forced, for
    constrained answers).
    """

    model: str = Field(default=DEFAULT_MODEL, alias="model_name")
    """Hub id or local directory of the target model."""
    drafter: DrafterName = "auto"
    """"auto": hybrid (long n-gram matches copied, the model's MTP assistant otherwise) when an
    assistant (X-assistant) exists, a draft model when `assistant_model` is an ordinary causal LM,
    else n-gram drafting."""
    assistant_model: str | None = None
    """Hub id or directory of the MTP assistant or draft model (default: found beside `model`)."""
    temperature: float = 0.0
    max_tokens: int = 512
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    draft_hint: DraftHint = "auto"
    num_draft_tokens: int | None = Field(default=None, ge=0, le=MAX_DRAFT_TOKENS)
    reasoning: bool = False
    """Ask the model to think first; its thoughts come back as reasoning content."""
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = Field(default_factory=list)
    ignore_eos: bool = False
    """Logits processors and stop ids, applied at every verified position so speculative output
    stays exact (docs/engine.md, "Logits processors"); each may also be passed per call."""
    device: str | None = None
    dtype: str | None = None
    model_kwargs: dict[str, Any] | None = None
    """Passed to `from_pretrained` when this class loads the model: `revision` (a hub branch, tag or
    commit), `token` (for gated repositories such as Gemma's; default: the `hf auth login` token or
    $HF_TOKEN), `attn_implementation` ("eager", "sdpa", ...), `trust_remote_code`."""
    mtp_stop_below: float | None = None
    """In-process MTP drafting stops a draft once the product of the drafter's own probabilities
    falls below this (None: the engine's draft schedule picks it from measured costs, DEFAULT_MTP_STOP_BELOW until it
    has measured; 0: always draft the full length). Set it to pin it; a server sets its own (`--mtp-stop-below`)."""
    mtp_siblings: int | None = None
    """In-process MTP drafting: runners-up per draft position that greedy calls verify beside the
    draft, as a tree (None: the engine's draft schedule picks it from measured costs, DEFAULT_MTP_SIBLINGS
    until it has measured; 0: the draft alone). Set it to pin it; a server sets its own (`--mtp-siblings`)."""
    streaming: bool = False
    """Make `invoke` stream under the hood (callbacks then see every burst)."""
    engine: Any = Field(default=None, exclude=True)
    """A ready `langchain_gemma_mtp.engine.Engine` to use instead of loading `model`."""
    base_url: str | None = None
    """An OpenAI-compatible server (e.g. "http://127.0.0.1:8000/v1") to send requests to instead
    of running the model here. Default: $GEMMA_MTP_BASE_URL, unless `engine=` is given."""
    api_key: SecretStr | None = None
    """Bearer token for `base_url`, when the server wants one. Default: $GEMMA_MTP_API_KEY."""
    default_headers: dict[str, str] | None = None
    """HTTP headers sent with every request to `base_url`."""
    client_kwargs: dict[str, Any] | None = None
    """Options of the httpx clients that talk to `base_url` (`verify`, `proxy`, `limits`, ...)."""
    timeout: float | None = 600.0
    """Seconds to wait on the server (connect, and between streamed chunks); None waits forever."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of a request the server could not take (connection failure, 408/429/5xx)."""

    model_config = ConfigDict(populate_by_name=True)

    _backend: Backend | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _name_from_engine(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("engine") is not None and not ({"model", "model_name"} & values.keys()):
            values = {**values, "model": values["engine"].name}
        return values

    @model_validator(mode="before")
    @classmethod
    def _server_from_environment(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        if values.get("base_url") is None and values.get("engine") is None and os.environ.get(BASE_URL_ENV):
            values["base_url"] = os.environ[BASE_URL_ENV]
        if values.get("api_key") is None and os.environ.get(API_KEY_ENV):
            values["api_key"] = os.environ[API_KEY_ENV]
        return values

    @model_validator(mode="after")
    def _one_place_to_run(self) -> ChatGemmaMTP:
        if self.base_url is not None and self.engine is not None:
            raise ValueError("pass either engine= (run here) or base_url= (run on a server), not both.")
        if self.model_kwargs:
            if self.base_url is not None or self.engine is not None:
                raise ValueError("model_kwargs apply when this class loads the model itself, not with base_url= or engine=.")
            check_load_options(self.model_kwargs)
        if self.base_url is None and self.engine is None:
            require_local_packages()  # fail here, naming the extra, rather than on the first call
        given = [name for name in ("mtp_stop_below", "mtp_siblings") if getattr(self, name) is not None]
        if given:
            if self.base_url is not None or self.engine is not None:
                raise ValueError(
                    f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} when this class loads the model itself: a server sets its own "
                    "(gemma-mtp serve --mtp-stop-below/--mtp-siblings), a ready engine= its drafter's "
                    "(MTPDrafter(stop_below=..., siblings_per_depth=...))."
                )
            mtp_settings(self.mtp_stop_below, self.mtp_siblings)
        return self

    @field_validator("draft_hint")
    @classmethod
    def _check_draft_hint(cls, value: DraftHint) -> DraftHint:
        check_draft_hint(value)
        return value

    @property
    def _llm_type(self) -> str:
        return "gemma-mtp"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "base_url": self.base_url,
            "drafter": self.drafter,
            "assistant_model": self.assistant_model,
            "device": self.device,
            "dtype": self.dtype,
            "mtp_stop_below": self.mtp_stop_below,
            "mtp_siblings": self.mtp_siblings,
            **{name: getattr(self, name) for name in _PER_CALL_FIELDS},
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = PROVIDER
        if "ls_stop" not in params and self.stop:
            params["ls_stop"] = self.stop
        return params

    # -- call options ---------------------------------------------------------------------------

    def _backend_for_calls(self) -> Backend:
        if self._backend is None and self.base_url is not None:
            self._backend = self._http_backend(self.timeout, self.max_retries)
        elif self._backend is None:
            self._backend = in_process_backend(
                self.model,
                self.drafter,
                self.assistant_model,
                self.device,
                self.dtype,
                mtp_stop_below=self.mtp_stop_below,
                mtp_siblings=self.mtp_siblings,
                load_options=self.model_kwargs,
                engine=self.engine,
            )
        return self._backend

    def _http_backend(self, timeout: float | None, max_retries: int) -> HTTPBackend:
        assert self.base_url is not None
        key = self.api_key.get_secret_value() if self.api_key else None
        return HTTPBackend(
            self.base_url, self.model, key, timeout, max_retries, headers=self.default_headers, client_kwargs=self.client_kwargs
        )

    # -- what other LangChain parts ask of a chat model -----------------------------------------

    def _resolve_model_profile(self) -> ModelProfile | None:
        """What the model can do, and its context size where it can be known without loading weights:
        a ready engine's, the config.json of a model dir or of a hub id in the local hub cache, or the
        server's /v1/models (one quick request at construction; pass `profile=` to skip it)."""
        profile: ModelProfile = {**_PROFILE, "name": self.model}
        if self.engine is not None:
            context = self.engine.max_positions
        elif self.base_url is not None:
            try:
                context = self._http_backend(PROFILE_PROBE_TIMEOUT_S, 0).context_length()
            except Exception:  # the server is down or is not ours: the profile goes without the size
                context = None
        else:
            context = context_length(self.model)
        if context is not None:
            profile["max_input_tokens"] = context
        return profile

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of plain text by the model's own tokenizer (loads the model's engine, or asks the server)."""
        return self._backend_for_calls().text_ids(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """The prompt length of a call with these messages and tools: the chat template's rendering,
        generation prompt included, exactly what the engine is given (0 for no messages)."""
        if not messages:
            return 0
        request = ChatRequest(messages=from_langchain(messages), tools=convert_tools(tools) if tools else None, reasoning=self.reasoning)
        return len(self._backend_for_calls().prompt_ids(request))

    def _request(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> ChatRequest:
        unknown = sorted(kwargs.keys() - _CALL_OPTIONS)
        if unknown:
            raise InvalidRequestError(f"unknown option(s) {unknown} for ChatGemmaMTP; known: {sorted(_CALL_OPTIONS)}.")
        model = kwargs.pop("model", None)
        if model is not None and model != self.model:
            raise InvalidRequestError(
                f"this ChatGemmaMTP runs {self.model!r} and cannot switch to {model!r} per call: make another ChatGemmaMTP(model=...)."
            )
        options = {name: getattr(self, name) for name in _PER_CALL_FIELDS}
        options.update(kwargs)
        return ChatRequest(messages=from_langchain(messages), stop=list(stop if stop is not None else self.stop or []), **options)

    @staticmethod
    def _with_config_hint(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Call options with the RunnableConfig's `configurable["draft_hint"]` as a fallback."""
        hint = ensure_config(config).get("configurable", {}).get("draft_hint")
        if hint is None or "draft_hint" in kwargs:
            return kwargs
        return {**kwargs, "draft_hint": hint}

    def invoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AIMessage:
        return super().invoke(input, config, stop=stop, **self._with_config_hint(config, kwargs))

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **self._with_config_hint(config, kwargs))

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, stop=stop, **self._with_config_hint(config, kwargs))

    def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, stop=stop, **self._with_config_hint(config, kwargs))

    # -- generation -----------------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        result = self._backend_for_calls().complete(request)
        return ChatResult(generations=[ChatGeneration(message=self._message(result))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        request = self._request(messages, stop, kwargs)
        result = await self._backend_for_calls().acomplete(request)
        return ChatResult(generations=[ChatGeneration(message=self._message(result))])

    # run_manager is unused on purpose: LangChain calls on_llm_new_token for every chunk we yield,
    # and passes no run_manager at all from `stream` and under LangGraph.
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request, chunks = self._request(messages, stop, kwargs), _ChunkBuilder(self.model)
        for delta in self._backend_for_calls().stream(request):
            yield chunks.build(delta)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request, chunks = self._request(messages, stop, kwargs), _ChunkBuilder(self.model)
        async for delta in self._backend_for_calls().astream(request):
            yield chunks.build(delta)

    def _message(self, result: Mapping[str, Any]) -> AIMessage:
        calls = [
            tool_call(name=c["function"]["name"], args=json.loads(c["function"]["arguments"] or "{}"), id=c["id"])
            for c in result["tool_calls"]
        ]
        invalid = [invalid_tool_call(name=c["name"], args=c["raw"], id=c["id"], error=c["error"]) for c in result["invalid_tool_calls"]]
        return AIMessage(
            content=result["content"],
            additional_kwargs={"reasoning_content": result["reasoning"]} if result["reasoning"] else {},
            tool_calls=calls,
            invalid_tool_calls=invalid,
            usage_metadata=_usage(result.get("usage")),
            response_metadata=_response_metadata(self.model, result),
        )

    # -- tools and structured output ------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (stored OpenAI-format under `tools`) and how they must be used.

        tool_choice: None/"auto" (the model decides), "none" (no tool call), "any"/"required"
        (some tool must be called), True (the only tool must be called), or a tool name (that
        tool must be called). A forced call is enforced: the prompt ends with the opening of the
        call, and a grammar holds what follows to the call syntax. strict=True marks every tool
        `strict` (OpenAI's flag): a grammar made from each tool's JSON schema constrains decoding,
        so every call parses and matches its schema (a schema part the grammar cannot enforce is a
        GrammarError when the call runs). parallel_tool_calls=False stops generation after the first call. Other kwargs (draft_hint, num_draft_tokens, ...) bind
        as call options. Raises ValueError at once for an unknown tool name or a schema that is
        not JSON-serializable.
        """
        formatted = convert_tools(tools)
        if strict is not None:
            formatted = [{**t, "function": {**t["function"], "strict": strict}} for t in formatted]
        options: dict[str, Any] = {"tools": formatted}
        choice = normalize_tool_choice(tool_choice, formatted)
        if choice is not None:
            options["tool_choice"] = choice
        if parallel_tool_calls is not None:
            options["parallel_tool_calls"] = parallel_tool_calls
        if "draft_hint" in kwargs:
            check_draft_hint(kwargs["draft_hint"])
        return super().bind(**options, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """Answers parsed into `schema` (a pydantic class, TypedDict, or JSON schema).

        method: "function_calling" forces a call of a tool made from the schema (strict=True: its
        arguments are grammar-constrained to the schema); "json_schema" and "json_mode" constrain
        the answer to JSON by a grammar, matching the schema with "json_schema" (which is shown to
        the model too). A schema part the grammar cannot enforce is a GrammarError when the call runs.
        """
        if kwargs:
            raise ValueError(f"unsupported arguments {sorted(kwargs)} for with_structured_output")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        trace: dict[str, Any] = {"ls_structured_output_format": {"kwargs": {"method": method}, "schema": schema}}
        parser: Runnable
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, **trace)
            if is_pydantic:
                parser = PydanticToolsParser(tools=[cast(type[BaseModel], schema)], first_tool_only=True)
            else:
                parser = JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
        elif method in ("json_schema", "json_mode"):
            if method == "json_schema":
                json_schema = convert_to_json_schema(schema)
                spec = {"name": json_schema.get("title", "response"), "schema": json_schema}
                if strict is not None:
                    spec["strict"] = strict
                response_format: dict[str, Any] = {"type": "json_schema", "json_schema": spec}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, **trace)
            parser = PydanticOutputParser(pydantic_object=cast(type[BaseModel], schema)) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(f"unknown method {method!r}: use 'function_calling', 'json_schema' or 'json_mode'.")
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")


class _ChunkBuilder:
    """Deltas of one stream to ChatGenerationChunks; remembers invalid-call reasons for the last chunk."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.errors: dict[str, str] = {}

    def build(self, delta: Mapping[str, Any]) -> ChatGenerationChunk:
        pieces = [
            tool_call_chunk(name=c["function"].get("name"), args=c["function"].get("arguments"), id=c.get("id"), index=c["index"])
            for c in delta.get("tool_calls", ())
        ]
        for bad in delta.get("invalid_tool_calls", ()):
            # The raw text as arguments: it never parses as JSON, so LangChain keeps the call invalid.
            pieces.append(tool_call_chunk(name=bad["name"], args=bad["raw"], id=bad["id"], index=bad["index"]))
            self.errors[bad["id"]] = bad["error"]
        last = "finish_reason" in delta
        metadata = _response_metadata(self.model_name, delta) if last else {}
        if last and self.errors:
            metadata["invalid_tool_call_errors"] = dict(self.errors)
        extra: dict[str, Any] = {"reasoning_content": delta["reasoning"]} if delta.get("reasoning") else {}
        if delta.get("burst_sizes"):  # absent from servers without this extension
            extra["burst_sizes"] = list(delta["burst_sizes"])
        message = AIMessageChunk(
            content=delta.get("content", ""),
            additional_kwargs=extra,
            tool_call_chunks=pieces,
            usage_metadata=_usage(delta.get("usage")) if last else None,
            response_metadata=metadata,
            chunk_position="last" if last else None,
        )
        return ChatGenerationChunk(message=message)


def _usage(usage: Mapping[str, Any] | None) -> UsageMetadata | None:
    if usage is None:  # a server that does not report usage
        return None
    return UsageMetadata(
        input_tokens=usage["prompt_tokens"],
        output_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
        input_token_details={"cache_read": usage["prompt_tokens_details"]["cached_tokens"]},
    )


def _response_metadata(model_name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    metadata = {"model_name": model_name, "model_provider": PROVIDER, "finish_reason": result["finish_reason"]}
    if result.get("speculative"):  # servers other than ours send no speculative stats
        metadata["speculative"] = dict(result["speculative"])
    return metadata
