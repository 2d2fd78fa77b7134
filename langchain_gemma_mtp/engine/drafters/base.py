"""The drafter protocol and the per-request decoding state drafters read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..target import KV
from ..types import SamplingParams
from ..verify import sample_or_argmax


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


class NoDrafter:
    """Plain autoregressive decoding through the same loop: the baseline."""

    name = "none"
    cost_per_draft_token = 0.0

    def start(self, state: DecodeState) -> None:
        pass

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        return [], None

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        pass


def pick_token(logits: torch.Tensor, state: DecodeState) -> tuple[int, torch.Tensor | None]:
    """Greedy or sampled choice of a draft token from one row of logits, as the request samples."""
    return sample_or_argmax(logits, state.sampling, state.generator)


def stack_probs(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    return torch.stack(rows) if rows and rows[0] is not None else None
