"""N-gram (prompt lookup) drafter: copies what followed the latest earlier occurrence of the current suffix."""

from __future__ import annotations

import torch

from .base import DecodeState


def lookup_continuation(tokens: list[int], k: int, max_ngram: int = 4, min_ngram: int = 1) -> list[int]:
    """Longest suffix n-gram (max_ngram down to min_ngram) found earlier in `tokens`; the up to k
    tokens after its most recent occurrence, or [] when nothing matches."""
    n_tokens = len(tokens)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        pattern = tokens[n_tokens - n:]
        last = pattern[-1]
        # Scan backwards: the most recent occurrence best predicts what comes next in agent text.
        for end in range(n_tokens - 2, n - 2, -1):
            if tokens[end] == last and tokens[end - n + 1:end + 1] == pattern:
                return tokens[end + 1:end + 1 + k]
    return []


class NgramDrafter:
    """Deterministic drafts (a point mass for the sampler); no model, no state."""

    name = "ngram"
    cost_per_draft_token = 0.05

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1):
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def start(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0:
            return [], None
        return lookup_continuation(state.tokens, k, self.max_ngram, self.min_ngram), None

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        pass
