"""Draft-length policies: a fixed length per call, or per-hint adaptive lengths learned from acceptance.

The adaptive policy models each draft token as accepted with probability alpha (given the ones
before it were) and picks the k in [1, MAX_DRAFT_TOKENS] that maximises expected tokens per unit of cost,
    E[tokens | k] / cost(k) = ((1 - alpha**(k+1)) / (1 - alpha)) / (1 + c * k),
where c is the cost of one draft token relative to one target forward (drafter step plus the extra
verification width). Each hint kind keeps its own alpha, so a code node and a prose node tune
themselves separately; nothing is stored in any transformers config.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..draft_settings import MAX_DRAFT_TOKENS
from .types import GenerationRequest

# Prior per-token acceptance per hint kind; the lengths they start at for the MTP drafter are the
# table in hints.py's docstring (tested against best_draft_length).
HINT_PRIOR_ALPHA = {"code": 0.7, "prose": 0.8, "tool_call": 0.85, "long_form": 0.9, "auto": 0.75}
PRIOR_WEIGHT = 8.0  # the prior counts as this many observed draft tokens
DECAY = 0.97  # per verification step: recent steps matter more than old ones
ALPHA_RANGE = (0.05, 0.98)


def best_draft_length(alpha: float, cost_per_draft_token: float) -> int:
    """The k in [1, MAX_DRAFT_TOKENS] with the most expected tokens per unit of cost."""
    a = min(max(alpha, ALPHA_RANGE[0]), ALPHA_RANGE[1])

    def value(k: int) -> float:
        return (1 - a ** (k + 1)) / (1 - a) / (1 + cost_per_draft_token * k)

    return max(range(1, MAX_DRAFT_TOKENS + 1), key=value)


@dataclass
class AcceptanceEstimate:
    """Decayed counts of accepted draft tokens over draft tokens that were tried."""

    accepted: float
    tried: float

    @classmethod
    def prior(cls, alpha: float) -> AcceptanceEstimate:
        return cls(alpha * PRIOR_WEIGHT, PRIOR_WEIGHT)

    @property
    def alpha(self) -> float:
        return self.accepted / self.tried

    def observe(self, drafted: int, accepted: int) -> None:
        # A draft stops being tried at its first rejection: accepted + 1 tries, or all of them.
        tried = accepted + (1 if accepted < drafted else 0)
        self.accepted = DECAY * self.accepted + accepted
        self.tried = DECAY * self.tried + tried


class DraftPolicy:
    """One request's draft-length policy."""

    def __init__(self, fixed: int | None, estimate: AcceptanceEstimate | None, cost: float, lock: threading.Lock):
        self.fixed = fixed
        self.estimate = estimate
        self.cost = cost
        self._lock = lock

    def next_length(self) -> int:
        if self.fixed is not None:
            return self.fixed
        assert self.estimate is not None  # every policy is built with a fixed length or an estimate
        with self._lock:
            return best_draft_length(self.estimate.alpha, self.cost)

    def observe(self, drafted: int, accepted: int) -> None:
        if self.estimate is not None and drafted:
            with self._lock:
                self.estimate.observe(drafted, accepted)


class DraftScheduler:
    """Per-engine registry of per-hint acceptance estimates."""

    def __init__(self, cost_per_draft_token: float):
        self.cost = cost_per_draft_token
        self._lock = threading.Lock()
        self._estimates = {h: AcceptanceEstimate.prior(a) for h, a in HINT_PRIOR_ALPHA.items()}

    def policy(self, request: GenerationRequest, *, can_draft: bool) -> DraftPolicy:
        """The policy for one call: fixed when it asks for a length, else adaptive for its hint kind.

        A call that may not learn across calls (`GenerationRequest.learns`: a seeded sampled one)
        adapts on a private copy of the hint's prior, so the same seed gives the same output
        whatever earlier calls taught the engine.
        """
        if not can_draft:
            return DraftPolicy(0, None, self.cost, self._lock)
        if request.num_draft_tokens is not None:
            return DraftPolicy(request.num_draft_tokens, None, self.cost, self._lock)
        hint = request.draft_hint
        if isinstance(hint, int):
            return DraftPolicy(hint, None, self.cost, self._lock)
        kind = hint or "auto"
        if not request.learns:
            return DraftPolicy(None, AcceptanceEstimate.prior(HINT_PRIOR_ALPHA[kind]), self.cost, threading.Lock())
        return DraftPolicy(None, self._estimates[kind], self.cost, self._lock)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Current alpha and chosen length per hint kind (for stats and docs)."""
        with self._lock:
            return {h: {"alpha": e.alpha, "draft_length": best_draft_length(e.alpha, self.cost)} for h, e in self._estimates.items()}
