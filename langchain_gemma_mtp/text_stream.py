"""Token ids to text as they arrive: an incremental detokenizer and a stop-string matcher.

Both hold text back rather than emit something that may change: the decoder holds the bytes of
a character that is not complete yet (byte-level tokenizers split multi-byte characters across
tokens), and the stop matcher holds the tail that could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .formats.streaming import partial_marker_len

# Decoding a token run from its very start can differ from decoding it in context (SentencePiece
# drops a leading space at the start of a text), so each piece is decoded after some context (the
# previous piece, or the prompt's last tokens for the first) whose own text is cut off again.
_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text pieces, never splitting a character.

    Special tokens are kept as text: the output parser needs Gemma's markers.
    """

    def __init__(self, tokenizer: Any, context_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0  # start of the window decoded as context
        self._read = len(self._ids)  # ids before this are already handed out as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_ids: Sequence[int]) -> str:
        """Text that `token_ids` complete; "" while a character is still incomplete."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The rest, at the end of generation (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if not final and (text.endswith(_REPLACEMENT) or len(text) <= len(before)):
            return ""  # the last token ends inside a multi-byte character (or added no text yet)
        # The text just handed out becomes the next piece's context: it starts on a character boundary.
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(before) :]


class StopMatcher:
    """Finds stop strings in streamed text, whatever the split, and truncates right before the one
    that completes first (at equal ends, the one that starts first).

    `push` returns (text safe to emit, stopped); text that could be the start of a stop string is
    held back until the next piece decides it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped or not self._stops:
            return "" if self.stopped else text
        buffer = self._held + text
        # The stop string that completes first wins: a streaming caller cannot wait to see whether
        # a longer one that started earlier will complete, and this way no split changes the result.
        hits = [(i + len(s), i) for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return buffer[: min(hits)[1]]
        keep = partial_marker_len(buffer, self._stops)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """Held-back text at the end of generation: it did not become a stop string."""
        held, self._held = self._held, ""
        return held
