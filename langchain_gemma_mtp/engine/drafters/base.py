"""The drafter protocol and the per-request decoding state drafters read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ...draft_settings import MAX_DRAFT_TOKENS
from ..cache import PrefixCache
from ..target import KV
from ..types import SamplingParams
from ..verify import choose_token


@dataclass
class DecodeState:
    """One request's committed sequence as the drafter sees it.

    `tokens[-1]` is the pending token: chosen, not yet fed to the target. `hidden` is the target's
    final hidden state at the token before it, `shared_kv` the target's K/V up to that token.
    """

    tokens: list[int]
    prompt_len: int
    hidden: torch.Tensor | None = None  # (1, 1, H)
    shared_kv: KV | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: torch.Generator | None = None
    drafter_state: Any = None  # per-request data a drafter keeps (its own KV cache), so drafters stay shareable
    prefix_cache: PrefixCache | None = None  # where a drafter with a KV cache of its own may reuse prefixes
    draft_limit: int = MAX_DRAFT_TOKENS  # most draft tokens this step may verify (room left, or a fixed length)
    reproducible: bool = False  # a seeded sampled request: drafts must not depend on other requests
    # Set by `propose` (greedy only): siblings[i] are other candidates for draft position i, verified
    # with the chain in one forward as a tree (engine/tree.py). Empty: a plain chain.
    siblings: list[list[int]] = field(default_factory=list)


class Drafter(Protocol):
    """Proposes draft tokens; told after each verification how many were kept."""

    name: str
    # Cost of one draft token relative to one target forward (drafting plus wider verification);
    # the adaptive schedule trades it against acceptance.
    cost_per_draft_token: float

    def start(self, state: DecodeState) -> None:
        """Begin a request: put any per-request data in `state.drafter_state`."""

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        """Up to k draft tokens after `state.tokens`, with the (k, V) probabilities they were sampled
        from, or None when drafting was deterministic (greedy or lookup)."""

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        """`state.tokens` now holds the verified continuation; roll back what was rejected."""

    def finish(self, state: DecodeState) -> None:
        """The request ended (done, cancelled or failed): keep what later requests can use."""

    def forget(self) -> None:
        """Drop what was learned from earlier requests."""


class StatelessDrafter:
    """Base of drafters that keep nothing per request or across requests: the hooks do nothing."""

    def start(self, state: DecodeState) -> None:
        pass

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        pass

    def finish(self, state: DecodeState) -> None:
        pass

    def forget(self) -> None:
        pass


class NoDrafter(StatelessDrafter):
    """Plain autoregressive decoding through the same loop: the baseline."""

    name = "none"
    cost_per_draft_token = 0.0

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        return [], None


def draft_token(logits: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A draft token chosen as the request samples (see verify.choose_token)."""
    return choose_token(logits, state.sampling, state.generator)


def finish_draft(tokens: list[torch.Tensor], probs: list[torch.Tensor | None]) -> tuple[list[int], torch.Tensor | None]:
    """Draft tensors to ids (one host sync per step) and stacked probabilities (None when greedy)."""
    ids = torch.cat(tokens).view(-1).tolist() if tokens else []
    return ids, torch.stack(probs) if probs and probs[0] is not None else None
