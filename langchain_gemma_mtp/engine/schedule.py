"""Draft plans: a fixed length per call, or per-hint adaptive plans priced with the engine's measured costs.

The adaptive policy models each hint kind's drafts as accepted position by position: alpha_i is the
chance that draft i is accepted given the ones before it were (decayed counts per position, shrunk
towards the kind's pooled rate where a position has few tries). It picks the k in
[1, MAX_DRAFT_TOKENS] with the most expected tokens per unit of time,

    rate(k) = E[tokens | k] / time(k),   E = 1 + sum_j prod_{i<=j} alpha_i,
    time(k) = share * (1 - row) + row * (k + 1) + call + draft * k   (in single-row target forwards, costs.StepCosts),

where row is the measured cost of one more verified row, draft that of one draft token, call the
fixed part of a drafter call (paid once, so it favours longer drafts), and share
the request's part of the forward's fixed cost, 1 / the requests verified in one batched forward
(costs.CostModel; before it has measured enough, the drafter's constant cost per draft token and
share 1); a request verified alone also pays its width bucket's measured excess over that line,
where the kernels step (float32 on CPU: 1-3 rows cost alike, 4 nearly double). Alone, a row costs
little beside the forward it rides on; beside fifteen other requests the forward's fixed cost is
split sixteen ways while each row is still paid in full, so the same acceptance buys shorter drafts
and narrower trees, and the batch's rows go to the likeliest tokens. Once costs are measured, the
same prices set the MTP drafter's early stop and tree width by the marginal rule: one more draft
token pays when its chance of acceptance exceeds what its time would earn at the chosen rate,
rate * (row + draft), and a sibling row when its chance exceeds rate * row; at most 1 / that many
siblings can, which caps the tree width. With the prior costs the drafter keeps its tuned
defaults. Each hint kind keeps its own statistics, so a code node and a prose node tune themselves
separately; nothing is stored in any transformers config.

A plan that never changes tells the cost fit nothing about other widths and the estimate nothing
about deeper positions: the fit's prior then holds the row cost, a cheaper narrower bucket is
never timed, and positions past the plan keep the pooled rate. So once costs are measured, every
EXPLORE_EVERY-th plan of a hint kind drafts twice its length, the next such plan half of it, in
turn: one step in sixteen off the best, which costs little where the rate is flat near its peak,
as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..draft_settings import MAX_DRAFT_TOKENS, MAX_MTP_SIBLINGS
from .costs import CostModel, StepCosts
from .types import GenerationRequest

# Prior per-token acceptance per hint kind; the lengths they start at for the MTP drafter are the
# table in hints.py's docstring (tested against best_draft_length).
HINT_PRIOR_ALPHA = {"code": 0.7, "prose": 0.8, "tool_call": 0.85, "long_form": 0.9, "auto": 0.75}
PRIOR_WEIGHT = 8.0  # the prior counts as this many observed draft tokens
POSITION_SHRINK = 4.0  # a position's rate counts the pooled rate as this many tries of its own
DECAY = 0.97  # per verification step: recent steps matter more than old ones
ALPHA_RANGE = (0.05, 0.98)
EXPLORE_EVERY = 16  # a hint kind's every 16th measured plan drafts twice its length, then half, in turn


@dataclass(frozen=True)
class DraftPlan:
    """One step's drafting: up to `k` tokens; for an MTP drafter the early-stop threshold, siblings per
    depth and a sibling's least chance (None: the drafter's own setting)."""

    k: int
    stop_below: float | None = None
    siblings: int | None = None
    sibling_min_chance: float | None = None


def best_length(alphas: Sequence[float], costs: StepCosts) -> tuple[int, float]:
    """(k, rate): the k in [1, len(alphas)] with the most expected tokens per unit of time, and that
    rate in tokens per single-row forward; alphas[i] is position i's conditional acceptance."""
    best, best_rate, expected, chance = 1, 0.0, 1.0, 1.0
    for k, alpha in enumerate(alphas, start=1):
        chance *= min(max(alpha, ALPHA_RANGE[0]), ALPHA_RANGE[1])
        expected += chance
        rate = expected / costs.time(k + 1, k)
        if rate > best_rate:
            best, best_rate = k, rate
    return best, best_rate


def best_draft_length(alpha: float, cost_per_draft_token: float) -> int:
    """The k in [1, MAX_DRAFT_TOKENS] with the most expected tokens per unit of cost, for one rate
    alpha at every position and the constant cost of a draft token."""
    return best_length([alpha] * MAX_DRAFT_TOKENS, StepCosts.prior(cost_per_draft_token))[0]


def plan_for(alphas: Sequence[float], costs: StepCosts) -> DraftPlan:
    """The plan for a hint kind's acceptance and the step costs (see the module docstring)."""
    k, rate = best_length(alphas, costs)
    if not costs.measured:
        return DraftPlan(k)
    sibling_min = rate * costs.row
    siblings = MAX_MTP_SIBLINGS if sibling_min <= 1.0 / MAX_MTP_SIBLINGS else int(1.0 / sibling_min)
    return DraftPlan(k, min(rate * (costs.row + costs.draft), 0.99), siblings, sibling_min)


@dataclass
class AcceptanceEstimate:
    """Decayed counts of accepted draft tokens over draft tokens that were tried, pooled and per position."""

    accepted: float
    tried: float
    accepted_at: list[float] = field(default_factory=lambda: [0.0] * MAX_DRAFT_TOKENS)
    tried_at: list[float] = field(default_factory=lambda: [0.0] * MAX_DRAFT_TOKENS)
    plans: int = 0  # plans made from it, which sets the exploring ones

    @classmethod
    def prior(cls, alpha: float) -> AcceptanceEstimate:
        return cls(alpha * PRIOR_WEIGHT, PRIOR_WEIGHT)

    @property
    def alpha(self) -> float:
        return self.accepted / self.tried

    def alphas(self) -> list[float]:
        """Each position's conditional acceptance, shrunk towards the pooled rate."""
        pooled = self.alpha
        return [(a + POSITION_SHRINK * pooled) / (t + POSITION_SHRINK) for a, t in zip(self.accepted_at, self.tried_at)]

    def observe(self, drafted: int, accepted: int) -> None:
        # A draft stops being tried at its first rejection: accepted + 1 tries, or all of them.
        tried = accepted + (1 if accepted < drafted else 0)
        self.accepted = DECAY * self.accepted + accepted
        self.tried = DECAY * self.tried + tried
        for i in range(MAX_DRAFT_TOKENS):
            self.accepted_at[i] = DECAY * self.accepted_at[i] + (i < accepted)
            self.tried_at[i] = DECAY * self.tried_at[i] + (i < tried)

    def copy(self) -> AcceptanceEstimate:
        return AcceptanceEstimate(self.accepted, self.tried, list(self.accepted_at), list(self.tried_at), self.plans)


class DraftPolicy:
    """One request's draft plans. `costs` is the engine's cost model, which the loop feeds with every
    step's timings; the plans are priced with it only when `measured` (else with its prior)."""

    def __init__(
        self, fixed: int | None, estimate: AcceptanceEstimate | None, costs: CostModel, lock: threading.Lock, *, measured: bool = True
    ):
        self.fixed = fixed
        self.estimate = estimate
        self.costs = costs
        self.measured = measured
        self._lock = lock

    def next_plan(self) -> DraftPlan:
        if self.fixed is not None:
            return DraftPlan(self.fixed)
        assert self.estimate is not None  # every policy is built with a fixed length or an estimate
        costs = self.costs.relative() if self.measured else self.costs.prior
        with self._lock:
            alphas = self.estimate.alphas()
            self.estimate.plans += 1
            explore = costs.measured and self.estimate.plans % EXPLORE_EVERY == 0
            wider = self.estimate.plans // EXPLORE_EVERY % 2 == 1
        plan = plan_for(alphas, costs)
        if not explore:
            return plan
        return replace(plan, k=min(MAX_DRAFT_TOKENS, 2 * plan.k) if wider else max(1, plan.k // 2))

    def observe(self, drafted: int, accepted: int) -> None:
        if self.estimate is not None and drafted:
            with self._lock:
                self.estimate.observe(drafted, accepted)


class DraftScheduler:
    """Per-engine registry of per-hint acceptance estimates, and the engine's measured step costs."""

    def __init__(self, cost_per_draft_token: float):
        self.costs = CostModel(cost_per_draft_token)
        self._lock = threading.Lock()
        self._estimates = {h: AcceptanceEstimate.prior(a) for h, a in HINT_PRIOR_ALPHA.items()}

    def policy(self, request: GenerationRequest, *, can_draft: bool) -> DraftPolicy:
        """The policy for one call: fixed when it asks for a length, else adaptive for its hint kind.

        A call that may not learn across calls (`GenerationRequest.learns`: a seeded sampled one)
        adapts on a private copy of the hint's prior and prices with the prior costs, so the same
        seed gives the same output whatever earlier calls taught the engine and whatever the
        machine's timing (its steps still teach the engine's cost model).
        """
        if not can_draft:
            return DraftPolicy(0, None, self.costs, self._lock)
        if request.num_draft_tokens is not None:
            return DraftPolicy(request.num_draft_tokens, None, self.costs, self._lock)
        hint = request.draft_hint
        if isinstance(hint, int):
            return DraftPolicy(hint, None, self.costs, self._lock)
        kind = hint or "auto"
        if not request.learns:
            return DraftPolicy(None, AcceptanceEstimate.prior(HINT_PRIOR_ALPHA[kind]), self.costs, threading.Lock(), measured=False)
        return DraftPolicy(None, self._estimates[kind], self.costs, self._lock)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per hint kind: the pooled alpha and the plan a learning call would get now (for stats and docs)."""
        costs = self.costs.relative()
        with self._lock:
            estimates = {h: e.copy() for h, e in self._estimates.items()}
        out: dict[str, dict[str, float]] = {}
        for h, e in estimates.items():
            plan = plan_for(e.alphas(), costs)
            out[h] = {"alpha": e.alpha, "draft_length": plan.k}
            if plan.stop_below is not None:
                out[h] |= {"stop_below": plan.stop_below, "siblings": plan.siblings or 0}
        return out
