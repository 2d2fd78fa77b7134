"""Hybrid drafter: copy a long n-gram match (this request or recent ones) when there is one; for a
short match, copy it or let the MTP drafter guess, whichever has lately been worth more."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from ..cache import common_prefix_length
from .base import Draft, DraftRequest, DraftSession, DraftStep
from .mtp import MTPDrafter
from .ngram import NgramDrafter, NgramSession

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


class HybridDrafter:
    """Lossless either way: copied drafts are point masses, MTP drafts carry their probabilities.

    Matches of `min_match`+ tokens are always copied. A shorter match is copied when the copies'
    worth beats MTP's: each is the decayed mean per step of accepted draft tokens less the drafter's
    cost per draft token times the tokens drafted. A short match is scored on every step it exists,
    against the tokens the target verified (when MTP drafted, only as far as those reach: a lower
    bound); MTP is scored on the steps it drafts. A strong assistant thus keeps drafting past
    short matches, while a weak one (the 270M's distilled drafter on echoing text) yields to them.
    The choice reads only verified history, so outputs stay the target's. Estimates are shared
    across requests, except for requests that may not learn across calls (seeded sampled ones),
    which start from the priors (reproducible).
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

    def open(self, request: DraftRequest) -> HybridSession:
        return HybridSession(self, self.ngram.open(request), self.worth if request.learns else prior_worth())

    def forget(self) -> None:
        self.ngram.forget()
        self.worth = prior_worth()

    def propose_many(self, items: Sequence[tuple[DraftSession, DraftStep]]) -> list[Draft]:
        """Copies where each request copies; the requests that need MTP draft in one batch."""
        sessions = [cast(HybridSession, session) for session, _ in items]
        drafts = [session.copy(step) for session, (_, step) in zip(sessions, items)]
        need = [i for i, d in enumerate(drafts) if d is None]
        for i, draft in zip(need, self.mtp.propose_many([(self.mtp, items[i][1]) for i in need])):
            drafts[i] = sessions[i].drafted(draft)
        return cast(list[Draft], drafts)


class HybridSession:
    """One request's choice between copying and MTP, and what its last step drafted."""

    def __init__(self, drafter: HybridDrafter, ngram: NgramSession, worth: dict[str, Worth]):
        self.drafter = drafter
        self.ngram = ngram
        self.worth = worth
        self.short_match: list[int] | None = None  # a short match's tokens, scored whichever drafter ran
        self.mtp_drafted: int | None = None  # draft tokens MTP proposed this step, None when a copy was used

    def propose(self, step: DraftStep) -> Draft:
        draft = self.copy(step)
        return draft if draft is not None else self.drafted(self.drafter.mtp.propose(step))

    def copy(self, step: DraftStep) -> Draft | None:
        """The match to copy, or None when MTP should draft this step."""
        hybrid = self.drafter
        match = self.ngram.find(step)
        self.short_match, self.mtp_drafted = None, None
        if match.tokens and match.length >= hybrid.min_match:
            hybrid.choices["long"] += 1
            return Draft(match.tokens)
        if match.tokens:
            self.short_match = match.tokens
            if self.worth["ngram"].mean >= self.worth["mtp"].mean:
                hybrid.choices["short"] += 1
                return Draft(match.tokens)
        return None

    def drafted(self, draft: Draft) -> Draft:
        """Note the MTP draft this step used (after `copy` said MTP drafts)."""
        self.mtp_drafted = len(draft)
        self.drafter.choices["mtp" if self.short_match is None else "mtp_over_short"] += 1
        return draft

    def commit(self, tokens: Sequence[int], n_accepted: int) -> None:
        hybrid = self.drafter
        if self.short_match is not None:
            verified = tokens[len(tokens) - n_accepted - 1 :]
            accepted = common_prefix_length(self.short_match, verified)
            self.worth["ngram"].observe(accepted - hybrid.ngram.cost_per_draft_token * len(self.short_match))
        if self.mtp_drafted is not None:
            self.worth["mtp"].observe(n_accepted - hybrid.mtp.cost_per_draft_token * self.mtp_drafted)
        self.short_match, self.mtp_drafted = None, None  # a step without drafts scores nothing

    def close(self, tokens: Sequence[int]) -> None:
        self.ngram.close(tokens)
