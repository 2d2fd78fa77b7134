"""Draft trees: a draft chain plus siblings (other candidates at each depth), laid out for one verify forward.

The chain is drafted as usual; a sibling at depth i is another token the drafter scored for the
same place as chain[i-1], so it shares that token's parent. All nodes are verified in one target
forward: each attends to the cache and its own ancestors, at the position of its depth. When the
target rejects chain[i-1] but chose one of its siblings, that sibling is accepted and the target's
prediction after it comes free: one more token from the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    """Block layout: slot 0 the pending token, slots 1..len(chain) the chain, then the siblings
    depth by depth (the siblings). `alternatives[i]` holds the siblings of `chain[i]`."""

    chain: list[int]
    alternatives: list[list[int]]

    def tokens(self, pending: int) -> list[int]:
        return [pending, *self.chain, *(t for alts in self.alternatives for t in alts)]

    @property
    def width(self) -> int:
        return 1 + len(self.chain) + sum(map(len, self.alternatives))

    def depths(self) -> list[int]:
        return [0, *range(1, len(self.chain) + 1), *(i + 1 for i, alts in enumerate(self.alternatives) for _ in alts)]

    def parents(self) -> list[int]:
        """Each slot's parent slot (-1 for the pending token): a chain node's is the slot before it,
        a sibling's is its chain node's parent."""
        return [-1, *range(len(self.chain)), *(i for i, alts in enumerate(self.alternatives) for _ in alts)]

    def ancestry(self) -> torch.Tensor:
        """(width, width) bool: row i marks slot i and its ancestors, the block tokens it attends to."""
        parents = self.parents()
        seen = torch.zeros(self.width, self.width, dtype=torch.bool)
        for i in range(self.width):
            j = i
            while j >= 0:
                seen[i, j] = True
                j = parents[j]
        return seen

    def sibling_slot(self, depth: int, token: int) -> int | None:
        """The slot of `token` among the siblings at `depth` (1-based), if it is one."""
        if depth > len(self.alternatives) or token not in self.alternatives[depth - 1]:
            return None
        return 1 + len(self.chain) + sum(map(len, self.alternatives[: depth - 1])) + self.alternatives[depth - 1].index(token)
