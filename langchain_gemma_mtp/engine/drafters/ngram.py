"""N-gram drafting: copy what followed the best earlier match of the current suffix, in this request
or in recent requests' outputs (a bounded cross-call index, as in SuffixDecoding).

Agents resend history, quote tool results and repeat tool-call skeletons, so the longer a match in
an earlier output, the more of what followed is likely to follow again: such a match of m tokens
lets the draft grow to m tokens (up to MAX_DRAFT_TOKENS) even when the schedule asked for fewer.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import NamedTuple

from ...draft_settings import MAX_DRAFT_TOKENS
from .base import Draft, DraftRequest, DraftStep

MAX_MATCH = 16  # how far back a match is compared when choosing between occurrences
INDEX_KEY_LENGTHS = (8, 3)  # the index finds an occurrence by its last 8 tokens, else its last 3
INDEX_CONTEXT = 16  # prompt tokens kept before an indexed output, so its first tokens can be matched
DEFAULT_INDEX_TOKENS = 1 << 16


class Match(NamedTuple):
    """A draft copied from an earlier occurrence and how many tokens of context matched there."""

    tokens: list[int]
    length: int


NO_MATCH = Match([], 0)


def match_length(a: Sequence[int], a_end: int, b: Sequence[int], b_end: int) -> int:
    """How many tokens agree going back from a[a_end] and b[b_end] (up to MAX_MATCH)."""
    n = 0
    while n < MAX_MATCH and n <= a_end and n <= b_end and a[a_end - n] == b[b_end - n]:
        n += 1
    return n


def lookup_continuation(tokens: Sequence[int], k: int, min_ngram: int = 1) -> Match:
    """Up to k tokens that followed an earlier occurrence of the sequence's suffix, or NO_MATCH when
    none matches at least `min_ngram` tokens.

    The occurrence with the most tokens after it (up to k) wins, then the longer match, then the
    most recent. (Capping drafts by match length was measured on the workloads: it saved
    verification width but cost more forwards than it saved.)
    """
    n = len(tokens)
    if n < 2 or k <= 0:
        return NO_MATCH
    last = tokens[-1]
    best_key, best_end = (0, 0), -1
    for end in range(n - 2, -1, -1):  # most recent first
        if tokens[end] != last:
            continue
        length = match_length(tokens, end, tokens, n - 1)
        if length < min_ngram:
            continue
        key = (min(k, n - 1 - end), length)
        if key > best_key:
            best_key, best_end = key, end
            if key == (k, MAX_MATCH):
                break
    usable, length = best_key
    return Match(list(tokens[best_end + 1 : best_end + 1 + usable]), length) if usable else NO_MATCH


class SuffixIndex:
    """Recent requests' outputs, found by the n-grams that end inside them; bounded in tokens.

    Each key (the last 8 or 3 tokens before a position) maps to its occurrence in the most recent
    output, the earliest one there (the most tokens follow it: a looping output would otherwise
    offer only its last token), so a lookup costs two dict probes however much is indexed. The
    oldest outputs go first.
    """

    def __init__(self, max_tokens: int = DEFAULT_INDEX_TOKENS):
        self.max_tokens = max_tokens
        self._docs: collections.OrderedDict[int, list[int]] = collections.OrderedDict()
        self._table: dict[tuple[int, ...], tuple[int, int]] = {}
        self._next_id = 0
        self.tokens = 0

    def add(self, tokens: list[int]) -> None:
        if len(tokens) < 2 or len(tokens) > self.max_tokens:
            return
        doc_id, self._next_id = self._next_id, self._next_id + 1
        self._docs[doc_id] = tokens
        self.tokens += len(tokens)
        for end in range(len(tokens) - 2, -1, -1):  # positions with something after them, last first
            for size in INDEX_KEY_LENGTHS:
                if end + 1 >= size:
                    self._table[tuple(tokens[end + 1 - size : end + 1])] = (doc_id, end)
        while self.tokens > self.max_tokens:
            old_id, old = self._docs.popitem(last=False)
            self.tokens -= len(old)
            for end in range(len(old) - 1):
                for size in INDEX_KEY_LENGTHS:
                    key = tuple(old[end + 1 - size : end + 1]) if end + 1 >= size else None
                    if key is not None and self._table.get(key, (None,))[0] == old_id:
                        del self._table[key]

    def lookup(self, context: Sequence[int], k: int) -> Match:
        """Up to k tokens that followed the longest-keyed recent occurrence of the context's suffix."""
        for size in INDEX_KEY_LENGTHS:
            hit = self._table.get(tuple(context[len(context) - size :])) if len(context) >= size else None
            if hit is not None:
                doc = self._docs[hit[0]]
                end = hit[1]
                return Match(doc[end + 1 : end + 1 + k], match_length(doc, end, context, len(context) - 1))
        return NO_MATCH


class NgramDrafter:
    """Deterministic drafts (a point mass for the sampler) from the request and from the index.

    Built with its cross-call index; a request that may not learn across calls (a seeded sampled
    one) drafts from its own tokens only, so a seed reproduces its output whatever other requests
    taught the index (its output still feeds the index).
    """

    name = "ngram"
    cost_per_draft_token = 0.05

    def __init__(self, min_ngram: int = 1, index_tokens: int = DEFAULT_INDEX_TOKENS):
        self.min_ngram = min_ngram
        self.index = SuffixIndex(index_tokens) if index_tokens else None

    def open(self, request: DraftRequest) -> NgramSession:
        return NgramSession(self, request)

    def forget(self) -> None:
        if self.index is not None:
            self.index = SuffixIndex(self.index.max_tokens)


class NgramSession:
    """One request's n-gram drafting: its own tokens, and the index when it may learn across calls."""

    def __init__(self, drafter: NgramDrafter, request: DraftRequest):
        self.drafter = drafter
        self.request = request

    def find(self, step: DraftStep) -> Match:
        """The better of the request's own match and the index's; an index match's draft grows
        with its match length, up to `step.limit`.

        Only index matches grow: an earlier output that matches this long tends to repeat whole
        (an agent's call skeletons, re-quoted results), while a long match inside the prompt is
        often a text being edited, where long drafts were measured to cost more than they saved
        (the copy_edit workloads).
        """
        limit = min(MAX_DRAFT_TOKENS, step.limit)
        best = lookup_continuation(step.tokens, min(step.k, limit), self.drafter.min_ngram)
        index = self.drafter.index
        if index is not None and self.request.learns:
            other = index.lookup(step.tokens, limit)
            if other.length > best.length and other.tokens:
                return Match(other.tokens[: max(step.k, other.length)], other.length)
        return best

    def propose(self, step: DraftStep) -> Draft:
        return Draft(self.find(step).tokens)

    def commit(self, tokens: Sequence[int], n_accepted: int) -> None:
        pass

    def close(self, tokens: Sequence[int]) -> None:
        index, start = self.drafter.index, self.request.prompt_len
        if index is not None and len(tokens) > start:
            index.add(list(tokens[max(0, start - INDEX_CONTEXT) :]))
