"""Draft-model drafter: a smaller causal LM with the same vocabulary and a KV cache of its own."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..target import TargetModel
from .base import NO_DRAFT, Draft, DraftRequest, DraftStep, draft_token, finish_draft


class DraftModelDrafter:
    """Runs the small model autoregressively; after verification crops its cache to the kept prefix."""

    name = "draft_model"
    cost_per_draft_token = 0.2

    def __init__(self, model: TargetModel):
        self.model = model

    def open(self, request: DraftRequest) -> DraftModelSession:
        return DraftModelSession(self, request)

    def forget(self) -> None:
        pass  # its caches live in the engine's prefix cache


class DraftModelSession:
    """One request's draft-model KV cache and the token ids it holds."""

    def __init__(self, drafter: DraftModelDrafter, request: DraftRequest):
        self.drafter = drafter
        self.model = drafter.model
        self.request = request
        self.cache: DynamicCache | None = None  # built at the first step, from the prompt's longest cached prefix
        self.cached: list[int] = []

    def _feed(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        assert self.cache is not None  # propose builds it before the first feed
        fwd = self.model.forward(token_ids, self.cache, want_kv=False)
        return self.model.logits(fwd.hidden[-1])

    def propose(self, step: DraftStep) -> Draft:
        if step.k <= 0:
            return NO_DRAFT
        if self.cache is None:
            # The prompt's longest cached prefix in this draft model's own namespace of the prefix cache.
            prompt, store = list(step.tokens[: self.request.prompt_len]), self.request.prefix_cache
            n, layers = store.lookup(self.drafter, prompt) if store is not None else (0, None)
            self.cache, self.cached = self.model.new_cache(layers, n), prompt[:n]
        logits = self._feed(list(step.tokens[len(self.cached) :]))
        self.cached = list(step.tokens)
        drafts, probs = [], []
        for i in range(step.k):
            token, q = draft_token(logits, self.request)
            drafts.append(token)
            probs.append(q)
            if i < step.k - 1:
                logits = self._feed(token)
        ids, stacked = finish_draft(drafts, probs)
        self.cached.extend(ids[:-1])
        return Draft(ids, stacked)

    def commit(self, tokens: Sequence[int], n_accepted: int) -> None:
        if self.cache is None:
            return
        keep = 0
        limit = min(len(self.cached), len(tokens) - 1)  # the pending token is always fed anew
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        self.cache.crop(-(len(self.cached) - keep))
        del self.cached[keep:]

    def close(self, tokens: Sequence[int]) -> None:
        store = self.request.prefix_cache
        if store is not None and self.cache is not None and self.cache.get_seq_length() == len(self.cached):
            store.insert(self.drafter, self.cached, self.cache)
