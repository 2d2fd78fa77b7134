"""ChatRuntime: OpenAI-style chat requests in, OpenAI-style deltas out, over one Engine.

The runtime owns everything between chat and token ids: the chat template (with tools and the
thinking switch), forced tool calls, draft-hint resolution, the incremental detokenizer, the
model's output-format parser, stop strings, and usage and speculative stats. The LangChain
model and the HTTP server both call it, so a request parses the same way on either path.

A request (`ChatRequest`) mirrors OpenAI's chat-completions body plus a few extension fields
(`top_k`, `reasoning`, `draft_hint`, `num_draft_tokens`). `stream`/`astream` yield delta dicts
shaped like `choices[0].delta` of an OpenAI chunk, with extension keys:

    {"content": str}                       text of the answer
    {"reasoning": str}                     text of the thought channel
    {"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments"}}]}
    {"invalid_tool_calls": [{"index", "id", "name", "raw", "error"}]}   calls that cannot be used
    last delta: {"finish_reason", "usage": {...}, "speculative": {...}} (and any final text)
    {"burst_sizes": [int, ...]}            tokens of each burst verified since the previous delta

A delta is yielded for each verified burst that adds visible output; text that may still change
(a split character, a split marker, a possible stop-string start, an unclosed tool call) is held
until the next burst settles it. So `burst_sizes` usually holds one burst, several when text was
held back; over a request the lists add up to one entry per target forward and their sum is
`usage.completion_tokens`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from .chat_templates import FALLBACK_CHAT_TEMPLATE
from .errors import ContextLengthError, GrammarError, InvalidRequestError
from .formats import gemma4, json_calls
from .formats.grammar import OutputShape, gemma4_grammar, json_convention_grammar
from .formats.streaming import ParsedDelta, StreamingParser
from .hints import DraftHint, resolve_draft_hint
from .messages import check_tool, merge_consecutive, normalize_messages, normalize_tool_choice, tool_names
from .prompt import PromptEncoder
from .text_stream import IncrementalDecoder, StopMatcher

if TYPE_CHECKING:  # the engine imports torch; the runtime itself does not need it
    from .engine import Engine, RequestHandle
    from .engine.constraint import Grammar


# Markers that end a model turn, where the tokenizer has them as single tokens. `<|tool_response>`
# hands control to the tool runner in Gemma 4's format.
_END_MARKERS = ("<eos>", "<turn|>", "<end_of_turn>", "<|tool_response>")
_JSON_ONLY = "Answer with a single JSON object and nothing else."


@dataclass
class ChatRequest:
    """One chat request, OpenAI-shaped (see the module docstring for the extension fields)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    reasoning: bool = False
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    draft_hint: DraftHint = "auto"
    num_draft_tokens: int | None = None
    # Logits processors, as the engine takes them (Engine.generate); vLLM's stop_token_ids and ignore_eos.
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class PreparedPrompt:
    """A rendered request, ready for the engine."""

    prompt_ids: list[int]
    forced: str  # output text already committed in the prompt (a forced tool call or JSON opening)
    parser: StreamingParser
    draft_hint: str | int
    stop_strings: list[str]
    constraint: Grammar | None = None  # the grammar the answer must match (see `ChatRuntime.prepare`)


class ChatRuntime:
    """Chat over one engine: template, parse, stop strings, deltas. Safe to share between threads."""

    def __init__(self, engine: Engine, tokenizer: Any = None, model_name: str | None = None, *, chat_template: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        if self.tokenizer is None:
            raise InvalidRequestError(f"{engine.name} has no tokenizer: chat needs one; pass tokenizer=.")
        self.model_name = model_name or engine.name
        self.chat_template = chat_template or getattr(self.tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE
        self.prompts = PromptEncoder(self.tokenizer, self.chat_template, self.model_name)
        # Gemma 4's own tool-call format when the template renders it; the JSON convention otherwise.
        self.native_tools = "<|tool_call>" in self.chat_template
        vocab = self.tokenizer.get_vocab()
        self.stop_token_ids = frozenset(engine.stop_token_ids) | {vocab[m] for m in _END_MARKERS if m in vocab}
        self._internal_stops = [] if self.native_tools else ["<end_of_turn>", json_calls.TOOL_RESPONSE_OPEN]

    # -- prompt ---------------------------------------------------------------------------------

    def prepare(self, request: ChatRequest) -> PreparedPrompt:
        """Render the request; raises InvalidRequestError (a ValueError) for anything malformed.

        The answer is constrained by a grammar (formats/grammar.py, engine/constraint.py) when a
        tool is strict (`function.strict`: calls must match their schemas), a tool call is forced
        (the answer is calls that parse; their schemas are enforced when strict), or a
        response_format asks for JSON (json_schema: that schema; json_object: any object). The
        grammar describes the whole answer (a thought first when thinking is on); a forced
        opening (a call's head, JSON's `{`) ends the prompt and is the grammar's prefix, except
        with thinking on on a Gemma 4 template, where the grammar writes it after any thought
        (capped to leave the answer room: `formats.grammar.thought_cap`). A named tool_choice is
        one call; free strings are capped to fit the answer's room (`OutputShape.max_tokens`), so
        the grammar depends on max_tokens. GrammarError (a 400 on the server) names a schema part
        that cannot be enforced, before any model work.

        `prompt_ids` is what the engine is given, so its length is the token count of the request's
        messages and tools (ChatGemmaMTP.get_num_tokens_from_messages, the server's /tokenize). Whether
        it fits the context is checked on submission, so a prompt too long to run can still be counted.
        """
        messages = normalize_messages(request.messages)
        tools = [check_tool(t) for t in request.tools or ()]
        choice = normalize_tool_choice(request.tool_choice, tools)
        offered = tools if choice != "none" else []
        forced_name = choice["function"]["name"] if isinstance(choice, dict) else None
        forced = ""
        if choice == "required" or forced_name:
            forced = (gemma4 if self.native_tools else json_calls).forced_call_prefix(forced_name)
        draft_hint = resolve_draft_hint(request.draft_hint, messages, offered, choice)
        json_format = request.response_format if _wants_json(request.response_format) else None
        strict = any(t["function"].get("strict") is True for t in offered)
        constrained = strict or bool(forced) or json_format is not None
        notes = []
        if offered and not self.native_tools:
            notes.append(json_calls.tools_instruction(offered))
        if json_format is not None:
            notes.append(_json_instruction(json_format))
            forced = forced or "{"
        if notes:
            messages = _with_system_note(messages, "\n\n".join(notes))
        if not self.native_tools:
            messages = merge_consecutive(json_calls.inline_tool_history(messages))
        prompt_ids = self.prompts.encode(messages, offered if self.native_tools else None, request.reasoning)
        # Where the model starts: some templates end the prompt inside an open thought channel
        # (July 2026, thinking on, after tool responses); with thinking off a forced opening closes it first.
        in_thought = self.native_tools and gemma4.prompt_ends_in_thought(self.prompts.text_after(prompt_ids, gemma4.TURN))
        if self.native_tools:
            # Thinking on, the grammar writes the opening after any thought (jump-forward: no extra
            # forward), so the model reasons first, as vLLM constrains only after the reasoning.
            forced = "" if constrained and request.reasoning else gemma4.forced_opening(forced, in_thought)
        if forced:
            prompt_ids = self.prompts.append(prompt_ids, forced)
        constraint = None
        if constrained:
            shape = OutputShape(
                tools=[t for t in offered if forced_name in (None, t["function"]["name"])],
                calls_only=choice == "required" or forced_name is not None,
                # A named choice is one call of that tool, as vLLM constrains it; "required" may make several.
                single_call=request.parallel_tool_calls is False or forced_name is not None,
                json=_json_schema(json_format) if json_format is not None else None,
                thinking=request.reasoning,
                in_thought=in_thought,
                max_tokens=self._budget(len(prompt_ids), request.max_tokens),
            )
            constraint = self._grammar(shape, forced)
        names = set(tool_names(offered))
        parser: StreamingParser
        if self.native_tools:
            parser = gemma4.Gemma4OutputParser(names, thinking=request.reasoning, in_thought=in_thought)
        else:
            parser = json_calls.JsonToolCallParser(names)
        return PreparedPrompt(
            prompt_ids=prompt_ids,
            forced=forced,
            parser=parser,
            draft_hint=draft_hint,
            stop_strings=[*_stop_list(request.stop), *self._internal_stops],
            constraint=constraint,
        )

    def _grammar(self, shape: OutputShape, forced: str) -> Grammar:
        """The compiled grammar of an answer of `shape` in this model's output format, begun by
        the `forced` text the prompt ends with."""
        what = "response_format.json_schema" if shape.json and not shape.tools else "the tool schemas" if shape.tools else "the answer"
        prefix = self.tokenizer.encode(forced, add_special_tokens=False) if forced else []
        if not self.native_tools:
            return self.engine.grammar(json_convention_grammar(shape), what, prefix)
        vocab = self.tokenizer.get_vocab()

        def token(marker: str) -> int:
            if marker not in vocab:
                raise GrammarError(f"the tokenizer of {self.model_name} has no {marker!r} token, which Gemma 4's call syntax needs.")
            return vocab[marker]

        return self.engine.grammar(gemma4_grammar(shape, token), what, prefix)

    def _budget(self, prompt_tokens: int, max_tokens: int) -> int | None:
        """The room `_submit` will give the answer, which sizes the grammar's free strings; None
        when the request cannot run (submission then says why: prepare alone may still count it)."""
        try:
            return self._room(prompt_tokens, max_tokens)
        except InvalidRequestError:
            return None

    def _room(self, prompt_tokens: int, max_tokens: int) -> int:
        """max_tokens, cut to the room the context leaves after the prompt."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive int, got {max_tokens!r}.")
        context = self.engine.max_positions
        if context is None:
            return max_tokens
        if prompt_tokens >= context:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens but {self.model_name} has a context of {context} tokens: "
                "shorten the conversation (drop or summarize old turns)."
            )
        return min(max_tokens, context - prompt_tokens)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Plain text to token ids as message text is tokenized: marker strings in it stay text
        (with `add_special_tokens`, the tokenizer's own BOS and the like around it)."""
        return self.prompts.encode_text(text, add_special_tokens)

    # -- generation -----------------------------------------------------------------------------

    def _submit(self, request: ChatRequest, prepared: PreparedPrompt) -> tuple[RequestHandle, _Decoding]:
        handle = self.engine.submit(
            prepared.prompt_ids,
            max_new_tokens=self._room(len(prepared.prompt_ids), request.max_tokens),
            temperature=request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            seed=request.seed,
            num_draft_tokens=request.num_draft_tokens,
            draft_hint=prepared.draft_hint,
            # ignore_eos: only the caller's own stop ids end the answer (not the end of the turn).
            stop_token_ids=(frozenset() if request.ignore_eos else self.stop_token_ids) | frozenset(request.stop_token_ids),
            min_p=request.min_p,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=request.logit_bias,
            min_tokens=request.min_tokens,
            constraint=prepared.constraint,
        )
        return handle, _Decoding(self, request, prepared, handle)

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        """Deltas of one request; closing the iterator early cancels the request at its next step."""
        prepared = self.prepare(request)
        handle, decoding = self._submit(request, prepared)
        try:
            for burst in handle:
                delta = decoding.feed(burst.token_ids)
                if delta:
                    yield delta
                if decoding.done:
                    break
            yield decoding.finish()
        finally:
            handle.cancel()

    async def astream(self, request: ChatRequest) -> AsyncGenerator[dict[str, Any], None]:
        """`stream` for asyncio: awaits the engine's owner thread without blocking the loop. The
        prompt is prepared on a worker thread too: a long chat's template and tokenization take
        milliseconds, and the first grammar for a tokenizer (llguidance reads the whole vocabulary)
        seconds, which would stall every other stream of a server."""
        prepared = await asyncio.to_thread(self.prepare, request)
        handle, decoding = self._submit(request, prepared)
        try:
            async for burst in handle:
                delta = decoding.feed(burst.token_ids)
                if delta:
                    yield delta
                if decoding.done:
                    break
            yield decoding.finish()
        finally:
            handle.cancel()

    def complete(self, request: ChatRequest) -> dict[str, Any]:
        """The whole answer as one OpenAI-style message (see `Completion`)."""
        completion = Completion()
        for delta in self.stream(request):
            completion.add(delta)
        return completion.message

    async def acomplete(self, request: ChatRequest) -> dict[str, Any]:
        completion = Completion()
        async for delta in self.astream(request):
            completion.add(delta)
        return completion.message


class Completion:
    """Deltas summed into one message: content, reasoning, whole tool calls, invalid calls, and
    the last delta's finish_reason, usage and speculative stats."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {"content": "", "reasoning": "", "tool_calls": [], "invalid_tool_calls": []}
        self._calls: dict[int, dict[str, Any]] = {}

    def add(self, delta: Mapping[str, Any]) -> None:
        message = self.message
        message["content"] += delta.get("content", "")
        message["reasoning"] += delta.get("reasoning", "")
        for piece in delta.get("tool_calls", ()):
            call = self._calls.get(piece["index"])
            if call is None:
                call = {"index": piece["index"], "id": None, "type": "function", "function": {"name": "", "arguments": ""}}
                self._calls[piece["index"]] = call
                message["tool_calls"].append(call)
            call["id"] = call["id"] or piece.get("id")
            call["function"]["name"] += piece["function"].get("name") or ""
            call["function"]["arguments"] += piece["function"].get("arguments") or ""
        message["invalid_tool_calls"].extend(delta.get("invalid_tool_calls", ()))
        for key in ("finish_reason", "usage", "speculative"):
            if key in delta:
                message[key] = delta[key]


class _Decoding:
    """One request's way from token ids to deltas: detokenize, stop strings, parse."""

    def __init__(self, runtime: ChatRuntime, request: ChatRequest, prepared: PreparedPrompt, handle: RequestHandle) -> None:
        self.end_ids = runtime.stop_token_ids
        self.request = request
        self.prepared = prepared
        self.handle = handle
        self.started = time.perf_counter()
        self.decoder = IncrementalDecoder(runtime.tokenizer, prepared.prompt_ids)
        self.stops = StopMatcher(prepared.stop_strings)
        self.parser = prepared.parser
        # The forced opening is output the model has already "written": it is parsed first.
        self.pending = self.parser.feed(prepared.forced)
        self.called = False  # a tool call (valid or not) was emitted
        self.unsent_bursts: list[int] = []  # sizes of the bursts verified since the last delta
        self.finish_reason: str | None = None  # set when the runtime, not the engine, ends the answer

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token_ids: Sequence[int]) -> dict[str, Any]:
        self.unsent_bursts.append(len(token_ids))
        # End-of-turn tokens end generation; they are not part of the answer.
        text = self.decoder.push([t for t in token_ids if t not in self.end_ids])
        parsed = self._parse(self.stops.push(text))
        if self.stops.stopped:
            self.finish_reason = "stop"
        elif self.called and self.request.parallel_tool_calls is False:
            self.finish_reason = "tool_calls"  # the one call allowed is complete: what follows is dropped
        delta = _delta(parsed)
        if delta:
            delta["burst_sizes"], self.unsent_bursts = self.unsent_bursts, []
        return delta

    def _parse(self, text: str, final: bool = False) -> ParsedDelta:
        parsed, self.pending = self.pending, ParsedDelta()
        parsed.extend(self.parser.feed(text))
        if final:
            parsed.extend(self.parser.finish())
        self.called = self.called or bool(parsed.tool_calls or parsed.invalid_tool_calls)
        return parsed

    def finish(self) -> dict[str, Any]:
        if self.finish_reason is None:  # the engine ended the answer: flush every buffer
            tail = self.stops.push(self.decoder.flush())
            parsed = self._parse(tail if self.stops.stopped else tail + self.stops.flush(), final=True)
            reason = "stop" if self.stops.stopped else self.handle.finish_reason or "length"
        else:
            # Cut at a stop string, text held back before it is released (and a cut-off tool
            # call becomes an invalid one); cut after a single call, the rest is dropped.
            parsed = self._parse("", final=self.finish_reason == "stop")
            reason = self.finish_reason
        if reason == "stop" and self.called:
            reason = "tool_calls"
        delta = _delta(parsed)
        if self.unsent_bursts:
            delta["burst_sizes"] = self.unsent_bursts
        delta.update(finish_reason=reason, usage=self._usage(), speculative=self._speculative())
        return delta

    def _usage(self) -> dict[str, Any]:
        prompt, completion = self.handle.prompt_tokens, len(self.handle.token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.handle.cached_tokens},
        }

    def _speculative(self) -> dict[str, Any]:
        stats = self.handle.stats
        elapsed = time.perf_counter() - self.started
        return {
            "drafter": stats.drafter,
            "draft_hint": self.prepared.draft_hint,
            "num_draft_tokens": self.request.num_draft_tokens,
            "drafted": stats.drafted,
            "sibling_tokens": stats.sibling_tokens,
            "jump_forward_tokens": stats.jump_forward_tokens,
            "jump_forward_accepted": stats.jump_forward_accepted,
            "accepted": stats.accepted,
            "acceptance_rate": stats.acceptance_rate,
            "mean_accepted_length": stats.mean_accepted_length,
            "per_position_acceptance": stats.per_position_acceptance,
            "draft_lengths": list(stats.draft_lengths),
            "verify_widths": list(stats.verify_widths),
            "step_costs": dict(stats.costs),
            "target_forwards": stats.target_forwards,
            "tokens_per_second": len(self.handle.token_ids) / elapsed if elapsed > 0 else 0.0,
        }


def _delta(parsed: ParsedDelta) -> dict[str, Any]:
    """An OpenAI-style delta for what the parser produced; the pieces of one call are merged."""
    delta: dict[str, Any] = {}
    if parsed.content:
        delta["content"] = parsed.content
    if parsed.reasoning:
        delta["reasoning"] = parsed.reasoning
    if parsed.tool_calls:
        merged = ParsedDelta()
        merged.extend(ParsedDelta(tool_calls=parsed.tool_calls))
        delta["tool_calls"] = [
            {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in merged.tool_calls
        ]
    if parsed.invalid_tool_calls:
        delta["invalid_tool_calls"] = [
            {"index": c.index, "id": c.id, "name": c.name, "raw": c.raw, "error": c.error} for c in parsed.invalid_tool_calls
        ]
    return delta


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}.")
    return list(stop)


def _wants_json(response_format: Mapping[str, Any] | None) -> TypeGuard[Mapping[str, Any]]:
    if response_format is None:
        return False
    kind = response_format.get("type")
    if kind not in ("text", "json_object", "json_schema"):
        raise InvalidRequestError(f"unsupported response_format type {kind!r}: use 'text', 'json_object' or 'json_schema'.")
    return kind != "text"


def _json_instruction(response_format: Mapping[str, Any]) -> str:
    """The system note of JSON mode: the answer opens with "{" and a grammar holds it to JSON (and to
    the schema, if any, which is shown to the model too)."""
    if response_format.get("type") != "json_schema":
        return _JSON_ONLY
    spec = response_format.get("json_schema") or {}
    if not isinstance(spec, Mapping):
        raise InvalidRequestError(f'response_format.json_schema must be an object {{"name", "schema"}}, got {type(spec).__name__}.')
    schema = spec.get("schema", spec)
    return f"{_JSON_ONLY} It must match this JSON schema:\n{json.dumps(schema, ensure_ascii=False)}"


def _json_schema(response_format: Mapping[str, Any]) -> Mapping[str, Any]:
    """The schema a JSON answer must match: json_schema's own, or {} (any object) for json_object."""
    if response_format.get("type") != "json_schema":
        return {}
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema", spec) if isinstance(spec, Mapping) else None
    if not isinstance(schema, Mapping):
        raise GrammarError(f"response_format.json_schema.schema must be a JSON schema object, got {type(schema).__name__}.")
    return schema


def _with_system_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    """Messages with `note` at the end of the system message (a new one when there is none)."""
    if messages and messages[0]["role"] in ("system", "developer"):
        first = dict(messages[0])
        first["content"] = "\n\n".join(t for t in (first["content"], note) if t)
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]
