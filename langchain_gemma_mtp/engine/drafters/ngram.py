"""N-gram (prompt lookup) drafter: copies what followed the best earlier match of the current suffix."""

from __future__ import annotations

import torch

from .base import DecodeState

MAX_MATCH = 8  # how far back a match is compared when choosing between occurrences


def lookup_continuation(tokens: list[int], k: int, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed the earlier occurrence of the sequence's suffix that matches it
    longest (compared up to MAX_MATCH tokens back; the most recent wins ties), or [] when no
    occurrence matches at least `min_ngram` tokens.

    The draft is capped at twice the match length: a one-token match predicts little, and every
    drafted token widens the verification forward.
    """
    n = len(tokens)
    if n < 2 or k <= 0:
        return []
    last = tokens[-1]
    best_end, best_len = -1, 0
    for end in range(n - 2, -1, -1):  # most recent first
        if tokens[end] != last:
            continue
        length = 1
        while length < MAX_MATCH and end - length >= 0 and tokens[end - length] == tokens[n - 1 - length]:
            length += 1
        if length > best_len:
            best_end, best_len = end, length
            if length == MAX_MATCH:
                break
    if best_len < min_ngram:
        return []
    return tokens[best_end + 1:best_end + 1 + min(k, 2 * best_len)]


class NgramDrafter:
    """Deterministic drafts (a point mass for the sampler); no model, no state."""

    name = "ngram"
    cost_per_draft_token = 0.05

    def __init__(self, min_ngram: int = 1):
        self.min_ngram = min_ngram

    def start(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        return lookup_continuation(state.tokens, k, self.min_ngram), None

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        pass
