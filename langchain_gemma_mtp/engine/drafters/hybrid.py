"""Hybrid drafter: copy a long n-gram match (this request or recent ones) when there is one; for a
short match, copy it or let the MTP drafter guess, whichever has lately been worth more."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import common_prefix_length
from .base import DecodeState
from .mtp import MTPDrafter
from .ngram import NgramDrafter

# A match this long is copied rather than drafted: in agent traffic (quoted tool results,
# repeated call skeletons, resent code) what follows such a match almost always follows again,
# and copying costs no drafter forwards.
HYBRID_MIN_MATCH = 6
DECAY = 0.95  # per scored step: the choice follows the text as it changes
# Priors, each counted as one step: MTP starts ahead, so a short match is copied only once copies
# were measured to be worth more (copies are scored on every step, MTP only when it drafts).
PRIOR_VALUE = {"ngram": 0.5, "mtp": 1.0}


@dataclass
class Worth:
    """Decayed mean, per step, of accepted draft tokens less the drafting cost (in target forwards)."""

    total: float
    steps: float = 1.0

    @property
    def mean(self) -> float:
        return self.total / self.steps

    def observe(self, value: float) -> None:
        self.total = DECAY * self.total + value
        self.steps = DECAY * self.steps + 1.0


def prior_worth() -> dict[str, Worth]:
    return {source: Worth(value) for source, value in PRIOR_VALUE.items()}


@dataclass
class HybridStep:
    """One request's view: the worth estimates it reads and what the last step drafted."""

    worth: dict[str, Worth]
    short_match: list[int] | None = None  # a short match's tokens, scored whichever drafter ran
    mtp_drafted: int | None = None  # draft tokens MTP proposed this step, None when a copy was used


class HybridDrafter:
    """Lossless either way: copied drafts are point masses, MTP drafts carry their probabilities.

    Matches of `min_match`+ tokens are always copied. A shorter match is copied when the copies'
    worth beats MTP's: each is the decayed mean per step of accepted draft tokens less the drafter's
    cost per draft token times the tokens drafted. A short match is scored on every step it exists,
    against the tokens the target verified (when MTP drafted, only as far as those reach: a lower
    bound); MTP is scored on the steps it drafts. A strong assistant thus keeps drafting past
    short matches, while a weak one (the 270M's distilled drafter on echoing text) yields to them.
    The choice reads only verified history, so outputs stay the target's. Estimates are shared
    across requests, except for seeded sampled ones, which start from the priors (reproducible).
    """

    name = "hybrid"

    def __init__(self, mtp: MTPDrafter, ngram: NgramDrafter, min_match: int = HYBRID_MIN_MATCH):
        self.mtp = mtp
        self.ngram = ngram
        self.min_match = min_match
        self.cost_per_draft_token = mtp.cost_per_draft_token
        self.worth = prior_worth()
        # Steps drafted each way over all requests: a long or short match copied, MTP past a short
        # match, MTP with no match.
        self.choices = {"long": 0, "short": 0, "mtp_over_short": 0, "mtp": 0}

    def start(self, state: DecodeState) -> None:
        state.drafter_state = HybridStep(prior_worth() if state.reproducible else self.worth)

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        step: HybridStep = state.drafter_state
        match = self.ngram.find(state, k)
        step.short_match, step.mtp_drafted = None, None
        if match.tokens and match.length >= self.min_match:
            self.choices["long"] += 1
            return match.tokens, None
        if match.tokens:
            step.short_match = match.tokens
            if step.worth["ngram"].mean >= step.worth["mtp"].mean:
                self.choices["short"] += 1
                return match.tokens, None
        draft, probs = self.mtp.propose(state, k)
        step.mtp_drafted = len(draft)
        self.choices["mtp" if step.short_match is None else "mtp_over_short"] += 1
        return draft, probs

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        step: HybridStep = state.drafter_state
        if step.short_match is not None:
            verified = state.tokens[len(state.tokens) - n_accepted - 1:]
            accepted = common_prefix_length(step.short_match, verified)
            step.worth["ngram"].observe(accepted - self.ngram.cost_per_draft_token * len(step.short_match))
        if step.mtp_drafted is not None:
            step.worth["mtp"].observe(n_accepted - self.mtp.cost_per_draft_token * step.mtp_drafted)
        step.short_match, step.mtp_drafted = None, None  # a step without drafts scores nothing

    def finish(self, state: DecodeState) -> None:
        self.ngram.finish(state)

    def forget(self) -> None:
        self.ngram.forget()
        self.worth = prior_worth()
