"""N-gram (prompt lookup) drafter: copies what followed the best earlier match of the current suffix."""

from __future__ import annotations

import torch

from .base import DecodeState

MAX_MATCH = 8  # how far back a match is compared when choosing between occurrences


def lookup_continuation(tokens: list[int], k: int, min_ngram: int = 1) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the sequence's suffix, or [] when no
    occurrence matches at least `min_ngram` tokens.

    The occurrence with the most tokens after it (up to k) wins, then the longer match (compared
    up to MAX_MATCH tokens back), then the most recent. (Capping drafts by match length was
    measured on the workloads: it saved verification width but cost more forwards than it saved.)
    """
    n = len(tokens)
    if n < 2 or k <= 0:
        return []
    last = tokens[-1]
    best_key, best_end, best_usable = (0, 0), -1, 0
    for end in range(n - 2, -1, -1):  # most recent first
        if tokens[end] != last:
            continue
        length = 1
        while length < MAX_MATCH and end - length >= 0 and tokens[end - length] == tokens[n - 1 - length]:
            length += 1
        if length < min_ngram:
            continue
        usable = min(k, n - 1 - end)
        if (usable, length) > best_key:
            best_key, best_end, best_usable = (usable, length), end, usable
            if usable == k and length == MAX_MATCH:
                break
    return tokens[best_end + 1:best_end + 1 + best_usable] if best_usable else []


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
