"""Draft-model drafter: a smaller causal LM with the same vocabulary and a KV cache of its own."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..target import TargetModel
from .base import DecodeState, draft_token, finish_draft


@dataclass
class _DraftCache:
    cache: DynamicCache
    cached: list[int] = field(default_factory=list)  # the token ids the cache holds


class DraftModelDrafter:
    """Runs the small model autoregressively; after verification crops its cache to the kept prefix."""

    name = "draft_model"
    cost_per_draft_token = 0.2

    def __init__(self, model: TargetModel):
        self.model = model

    def start(self, state: DecodeState) -> None:
        # The prompt's longest cached prefix in this draft model's own namespace of the prefix cache.
        prompt = state.tokens[:-1]
        n, layers = state.prefix_cache.lookup(self, prompt) if state.prefix_cache is not None else (0, None)
        state.drafter_state = _DraftCache(self.model.new_cache(layers, n), prompt[:n])

    def _feed(self, dc: _DraftCache, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        fwd = self.model.forward(token_ids, dc.cache, want_kv=False)
        return self.model.logits(fwd.hidden[-1])

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0:
            return [], None
        dc = state.drafter_state
        logits = self._feed(dc, state.tokens[len(dc.cached):])
        dc.cached = list(state.tokens)
        drafts, probs = [], []
        for i in range(k):
            token, q = draft_token(logits, state)
            drafts.append(token)
            probs.append(q)
            if i < k - 1:
                logits = self._feed(dc, token)
        ids, stacked = finish_draft(drafts, probs)
        dc.cached.extend(ids[:-1])
        return ids, stacked

    def commit(self, state: DecodeState, n_accepted: int) -> None:
        dc = state.drafter_state
        keep = 0
        limit = min(len(dc.cached), len(state.tokens) - 1)  # the pending token is always fed anew
        while keep < limit and dc.cached[keep] == state.tokens[keep]:
            keep += 1
        dc.cache.crop(-(len(dc.cached) - keep))
        del dc.cached[keep:]

    def forget(self) -> None:
        pass  # its caches live in the engine's prefix cache

    def finish(self, state: DecodeState) -> None:
        dc = state.drafter_state
        if state.prefix_cache is not None and dc is not None and dc.cache.get_seq_length() == len(dc.cached):
            state.prefix_cache.insert(self, dc.cached, dc.cache)
