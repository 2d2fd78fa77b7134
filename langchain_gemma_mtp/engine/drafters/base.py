"""The drafter contract: what a drafter is given (read-only views) and what it returns (a draft value).

A drafter is built with the services it keeps across calls (an n-gram index, a model); for each
request the loop opens a session with the request's constants and services (`DraftRequest`), then
every step hands it a read-only `DraftStep` and takes back a `Draft`; `commit` says how many draft
tokens stayed, `close` that the request ended. Nothing a drafter returns is written into shared
request state, and nothing it is given may be changed by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from ..cache import PrefixCache
from ..costs import CostModel
from ..target import KV
from ..types import SamplingParams
from ..verify import choose_token


@dataclass(frozen=True)
class DraftRequest:
    """What stays the same over one request, given when its session opens."""

    prompt_len: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    # False for a seeded sampled request: its drafts must not depend on other requests, so it does
    # not read what drafters learned across calls (one rule, decided by the engine).
    learns: bool = True
    prefix_cache: PrefixCache | None = None  # where a drafter with a KV cache of its own may reuse prefixes


@dataclass(frozen=True)
class DraftStep:
    """One step's read-only view of the request.

    `tokens[-1]` is the pending token: chosen, not yet fed to the target. `hidden` is the target's
    final hidden state at the token before it, `shared_kv` the target's K/V up to that token.
    """

    request: DraftRequest
    tokens: Sequence[int]
    k: int  # draft tokens the schedule asks for
    limit: int  # most draft tokens this step may verify (room left, or the caller's fixed length)
    hidden: torch.Tensor | None = None  # (1, 1, H)
    shared_kv: KV | None = None
    # The schedule's MTP settings for this step (schedule.DraftPlan; None: the drafter's own).
    stop_below: float | None = None
    siblings: int | None = None
    sibling_min_chance: float | None = None


@dataclass(frozen=True)
class Draft:
    """Draft tokens, the (len, V) probabilities they were sampled from (None for point masses:
    greedy drafting or lookup), and for greedy drafts `alternatives[i]`: other candidates for
    position i, verified beside the chain in one forward as a tree (engine/tree.py)."""

    tokens: list[int]
    probs: torch.Tensor | None = None
    alternatives: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)


NO_DRAFT = Draft([])


class DraftSession(Protocol):
    """One request's drafter."""

    def propose(self, step: DraftStep) -> Draft:
        """Up to `step.k` draft tokens after `step.tokens` (a drafter may go up to `step.limit`)."""

    def commit(self, tokens: Sequence[int], n_accepted: int) -> None:
        """`tokens` now holds the verified continuation, of which the last `n_accepted` + 1 are new."""

    def close(self, tokens: Sequence[int]) -> None:
        """The request ended (done, cancelled or failed): keep what later requests can use."""


class Drafter(Protocol):
    """Proposes draft tokens through one session per request."""

    name: str
    # Cost of one draft token relative to one target forward (drafting plus wider verification);
    # the adaptive schedule trades it against acceptance.
    cost_per_draft_token: float

    def open(self, request: DraftRequest) -> DraftSession:
        """A session for one request."""

    def forget(self) -> None:
        """Drop what was learned from earlier requests."""


class StatelessDrafter:
    """Base of drafters that keep nothing per request: the drafter is its own session."""

    def open(self, request: DraftRequest) -> DraftSession:
        return self  # type: ignore[return-value]  # subclasses define propose

    def commit(self, tokens: Sequence[int], n_accepted: int) -> None:
        pass

    def close(self, tokens: Sequence[int]) -> None:
        pass

    def forget(self) -> None:
        pass


class NoDrafter(StatelessDrafter):
    """Plain autoregressive decoding through the same loop: the baseline."""

    name = "none"
    cost_per_draft_token = 0.0

    def propose(self, step: DraftStep) -> Draft:
        return NO_DRAFT


@dataclass(frozen=True)
class DraftAsk:
    """A request's step waiting for its draft: the owner thread gathers these across requests and
    drafts them together (`propose_all`) per drafter."""

    drafter: Drafter
    session: DraftSession
    step: DraftStep
    costs: CostModel | None = None  # where the time of drafting is measured (its engine's)


def propose_all(drafter: Drafter, items: Sequence[tuple[DraftSession, DraftStep]]) -> list[Draft]:
    """Drafts for several requests' steps on one drafter: in one batch where the drafter drafts in
    batches (its `propose_many`: MTP, hybrid), else session by session."""
    many = getattr(drafter, "propose_many", None)
    if many is not None and len(items) > 1:
        return many(items)
    return [session.propose(step) for session, step in items]


def draft_token(logits: torch.Tensor, request: DraftRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft token chosen as the request samples (see verify.choose_token)."""
    return choose_token(logits, request.sampling, request.generator)


def finish_draft(tokens: list[torch.Tensor], probs: list[torch.Tensor | None]) -> tuple[list[int], torch.Tensor | None]:
    """Draft tensors to ids (one host sync per step) and stacked probabilities (None when greedy)."""
    ids = torch.cat(tokens).view(-1).tolist() if tokens else []
    # A request samples at every step or at none: the first entry says which.
    return ids, torch.stack(cast(list[torch.Tensor], probs)) if probs and probs[0] is not None else None
