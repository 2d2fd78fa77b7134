"""A drafter of controlled acceptance, for tests and benchmarks only: it replays the target's own output.

`ReplayDrafter` is given the continuation a plain run of the target produced (drafter "none", or
`Engine.generate` without drafts) and drafts it back, each position of it kept with probability
`accept` (a fixed, seeded choice per position) and otherwise replaced by a wrong token. Under
greedy verification a kept token is always accepted and a replaced one always rejected, so the
acceptance rate is `accept` at every draft depth, on any model, without trained weights: policies
can be compared on a random-weight model of a real shape. `accept=1.0` is an oracle and
`accept=0.0` a drafter that is always wrong.

A draft token's cost is real time: with `step_size=n` each draft token first multiplies a 1 x n
vector by an n x n matrix (in `dtype`), so drafting takes the threads and memory bandwidth a small
drafter's step does and slows down with the machine as one would; sleeping instead would leave the
cores idle and under-state drafting on a loaded machine. Without it a draft token costs only a list
lookup, like n-gram drafting. It is not in the engine's drafter registry: it needs the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..engine.drafters import Draft, DraftStep, StatelessDrafter
from ..errors import InvalidRequestError


class ReplayDrafter(StatelessDrafter):
    """Drafts `continuation[i]` for new token i when position i is kept, else `(continuation[i] + 1) % vocab_size`."""

    def __init__(
        self,
        continuation: Sequence[int],
        accept: float,
        vocab_size: int,
        *,
        seed: int = 0,
        step_size: int = 0,
        dtype: torch.dtype = torch.float32,
        name: str = "replay",
        cost_per_draft_token: float = 0.1,  # priced like the MTP drafter by the constant-cost prior
    ):
        if not 0.0 <= accept <= 1.0:
            raise InvalidRequestError(f"accept must be a probability in [0, 1] (the share of draft positions kept), got {accept!r}.")
        self.continuation = list(continuation)
        self.accept = accept
        self.vocab_size = vocab_size
        self.name = name
        self.cost_per_draft_token = cost_per_draft_token
        self.kept: list[bool] = []
        self.repattern(seed)
        self._work = None
        if step_size:
            g = torch.Generator().manual_seed(seed)
            self._work = (torch.randn(1, step_size, generator=g).to(dtype), torch.randn(step_size, step_size, generator=g).to(dtype))

    def repattern(self, seed: int) -> None:
        """Choose anew which positions are kept: another pattern at the same acceptance."""
        g = torch.Generator().manual_seed(seed)
        self.kept = (torch.rand(len(self.continuation), generator=g) < self.accept).tolist()

    def propose(self, step: DraftStep) -> Draft:
        done = len(step.tokens) - step.request.prompt_len  # new tokens so far, the pending one included
        positions = range(done, min(done + step.k, len(self.continuation)))
        if self._work is not None:
            x, w = self._work
            for _ in positions:
                x = torch.tanh(x @ w)  # each step reads the last one's result, as a drafter's steps do
        return Draft([self.continuation[i] if self.kept[i] else (self.continuation[i] + 1) % self.vocab_size for i in positions])
