"""Hybrid drafter: copy a long n-gram match (this request or recent ones) when there is one, else
let the MTP drafter guess."""

from __future__ import annotations

import torch

from .base import DecodeState, StatelessDrafter
from .mtp import MTPDrafter
from .ngram import NgramDrafter

# A match this long is copied rather than drafted: in agent traffic (quoted tool results,
# repeated call skeletons, resent code) what follows such a match almost always follows again,
# and copying costs no drafter forwards.
HYBRID_MIN_MATCH = 6


class HybridDrafter(StatelessDrafter):
    """Lossless either way: copied drafts are point masses, MTP drafts carry their probabilities."""

    name = "hybrid"

    def __init__(self, mtp: MTPDrafter, ngram: NgramDrafter, min_match: int = HYBRID_MIN_MATCH):
        self.mtp = mtp
        self.ngram = ngram
        self.min_match = min_match
        self.cost_per_draft_token = mtp.cost_per_draft_token

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        match = self.ngram.find(state, k)
        if match.length >= self.min_match and match.tokens:
            return match.tokens, None
        return self.mtp.propose(state, k)

    def finish(self, state: DecodeState) -> None:
        self.ngram.finish(state)

    def forget(self) -> None:
        self.ngram.forget()
