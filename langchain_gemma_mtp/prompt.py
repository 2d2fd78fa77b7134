"""Chat prompts to token ids, where only the chat template's own markers become control tokens.

A prompt rendered to one string and re-encoded with special tokens parsed lets message text
write control tokens: a tool result (a web page, a file) containing `<turn|><|turn>system` would
open a real system turn. transformers' `apply_chat_template(..., sanitize_control_tokens=True)`
marks every control-token string inside message values before rendering and encodes the marked
ones as plain text, so the template's own markers are the only control tokens in the prompt. A
conversation without such strings encodes exactly as before (same ids, so the prefix cache stays
exact). Dict keys are not marked by transformers; keys that carry a control token are refused here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from jinja2 import TemplateError

from .errors import InvalidRequestError


class PromptEncoder:
    """Encodes chat requests for one tokenizer and chat template; safe to share between threads."""

    def __init__(self, tokenizer: Any, chat_template: str, model_name: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.model_name = model_name
        # Every added token but whitespace ones counts as a marker here (a superset of what
        # transformers sanitizes: it refuses keys and decides where a continuation may join).
        markers = {t.content for t in tokenizer.added_tokens_decoder.values() if t.content.strip()}
        self._added_ids = frozenset(tokenizer.added_tokens_decoder)
        self._markers_re = _any_of(markers)
        # What `apply_chat_template(..., sanitize_control_tokens=True)` marks, for this template.
        self._control_re = _any_of(tokenizer._get_control_tokens(chat_template))
        self._tables = _AddedTokenTables(tokenizer)
        self._warm_up()

    def _warm_up(self) -> None:
        """Fill transformers' caches for this tokenizer and template now (the sanitizing regex over
        every added token and the compiled template: 0.4-0.8 s for Gemma's 6,384 added tokens):
        caches that are filled on a first request are filled by every request arriving before one
        finishes, and the parallel branches of a graph's first step compiled them once each, on the
        GIL the engine's thread needs (docs/research-notes.md, "First calls")."""
        try:
            self.encode([{"role": "user", "content": ""}], None, False)
        except InvalidRequestError:
            pass  # a template that refuses this conversation refuses real ones with its own message

    def encode(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, reasoning: bool) -> list[int]:
        """Prompt ids for `messages` with the generation prompt."""
        _check_keys(messages, "messages", self._markers_re)
        _check_keys(tools or [], "tools", self._markers_re)
        # Here, not at import: a client-only install (no transformers) imports the runtime too.
        from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

        try:
            rendered = self.tokenizer.apply_chat_template(
                mark_control_tokens(messages, self._control_re),
                tools=mark_control_tokens(tools, self._control_re) or None,
                chat_template=self.chat_template,
                add_generation_prompt=True,
                tokenize=False,
                enable_thinking=reasoning,
            )
            ids = encode_marked_chat(self._tables, rendered)
        except TemplateError as exc:
            raise InvalidRequestError(f"the chat template of {self.model_name} rejected the messages: {exc}") from exc
        except ValueError as exc:  # transformers: the tokenizer builds a control token from plain text
            raise InvalidRequestError(f"cannot encode this conversation safely with the tokenizer of {self.model_name}: {exc}") from exc
        return list(ids)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Plain text to ids as message text is encoded: marker strings in it stay text; with
        `add_special_tokens`, inside the tokens the tokenizer puts around a text (its BOS).

        Marks them as transformers' sanitizing does, rather than switching the shared tokenizer's
        `split_special_tokens` flag, which other threads' encodes would race with.
        """
        # Here, not at import: a client-only install (no transformers) imports the runtime too.
        from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

        ids = encode_marked_chat(self._tables, mark_control_tokens(text, self._markers_re))
        if not add_special_tokens:
            return ids
        # The tokenizer's frame, read off a probe text: what it adds before and after.
        probe = self.tokenizer.encode("a", add_special_tokens=False)
        framed = self.tokenizer.encode("a", add_special_tokens=True)
        start = next(i for i in range(len(framed)) if framed[i : i + len(probe)] == probe)
        return framed[:start] + ids + framed[start + len(probe) :]

    def text_after(self, ids: list[int], marker: str) -> str:
        """The prompt's text from the last `marker` control token on ("" when it has none). Only
        the template writes control tokens, so message text cannot move where this starts."""
        marker_id = self.tokenizer.convert_tokens_to_ids(marker)
        start = max((i for i, t in enumerate(ids) if t == marker_id), default=None)
        return "" if start is None else self.tokenizer.decode(ids[start:])

    def append(self, ids: list[int], continuation: str) -> list[int]:
        """`ids` + `continuation`, encoded as if the template had written it.

        The text after the prompt's last control token (e.g. `model\\n`) is template text:
        re-encoding it with the continuation keeps the tokenization one encode of the whole string
        would give (`\\n{` may be one token). Where that tail is not plain template text, the
        continuation is encoded on its own.
        """
        encode = self.tokenizer.encode
        start = max((i + 1 for i, t in enumerate(ids) if t in self._added_ids), default=0)
        tail = self.tokenizer.decode(ids[start:])
        if encode(tail, add_special_tokens=False) == ids[start:] and not self._markers_re.search(tail):
            return ids[:start] + encode(tail + continuation, add_special_tokens=False)
        return ids + encode(continuation, add_special_tokens=False)


class _AddedTokenTables:
    """The tokenizer for `encode_marked_chat`, with its added-token table read once (transformers
    rebuilds it from the Rust tokenizer on every read: about 8 ms for Gemma's 6,384 added tokens).
    An encoder is made with its tokenizer, whose added tokens do not change after loading."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.added_tokens_encoder = tokenizer.added_tokens_encoder

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _any_of(strings: Any) -> re.Pattern:
    """A regex matching any of `strings`, the longest first (one that never matches for none)."""
    return re.compile("|".join(map(re.escape, sorted(strings, key=len, reverse=True))) or "(?!)")


def _check_keys(value: Any, where: str, markers: re.Pattern) -> None:
    """Refuse object keys that carry a control token (`markers` matches any): the template writes
    keys as they are. One regex search a key, not a substring test per marker: Gemma's 6,384
    markers made that 0.2 ms a key, 30 ms for the keys of ten tool schemas, on every call."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and markers.search(key):
                raise InvalidRequestError(
                    f"{where} has the key {key!r}, which contains a control token of the model's "
                    "tokenizer: rename the key (tool parameters and argument names must be plain text)."
                )
            _check_keys(item, f"{where}.{key}", markers)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for i, item in enumerate(value):
            _check_keys(item, f"{where}[{i}]", markers)
