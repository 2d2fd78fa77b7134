"""Draft-model drafter: a smaller causal LM with the same vocabulary and a KV cache of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from transformers import DynamicCache

from ..batch import Feed, run_feeds
from ..target import TargetModel
from .base import NO_DRAFT, Draft, DraftRequest, DraftSession, DraftStep, draft_token, finish_draft


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

    def propose_many(self, items: Sequence[tuple[DraftSession, DraftStep]]) -> list[Draft]:
        """Drafts for several requests at once: each draft step of the small model runs over all the
        requests still drafting in one batched forward (engine/batch.py), as the target verifies."""
        sessions = [cast(DraftModelSession, session) for session, _ in items]
        steps = [step for _, step in items]
        live = [i for i, step in enumerate(steps) if step.k > 0]
        feeds = {i: sessions[i].catch_up(steps[i]) for i in live}
        drafted: dict[int, tuple[list[torch.Tensor], list[torch.Tensor | None]]] = {i: ([], []) for i in live}
        for depth in range(max((steps[i].k for i in live), default=0)):
            going = [i for i in live if depth < steps[i].k]
            # A request's first step feeds its whole prompt, with logits of its last row only; the
            # prompts join the other requests' steps in one forward, attending apart from them.
            going.sort(key=lambda i: feeds[i].prefill)
            outs = dict(zip(going, run_feeds([feeds[i] for i in going])))
            for i in going:
                logits = outs[i].logits
                assert logits is not None  # run_feeds returns the rows' logits (a prompt's last row)
                token, q = draft_token(logits[-1], sessions[i].request)
                drafted[i][0].append(token)
                drafted[i][1].append(q)
                feeds[i] = Feed(self.model, [int(token)], sessions[i].live_cache)
        drafts = [NO_DRAFT] * len(items)
        for i in live:
            drafts[i] = sessions[i].drafted(*drafted[i])
        return drafts


class DraftModelSession:
    """One request's draft-model KV cache and the token ids it holds."""

    def __init__(self, drafter: DraftModelDrafter, request: DraftRequest):
        self.drafter = drafter
        self.model = drafter.model
        self.request = request
        self.cache: DynamicCache | None = None  # built at the first step, from the prompt's longest cached prefix
        self.cached: list[int] = []

    @property
    def live_cache(self) -> DynamicCache:
        assert self.cache is not None  # catch_up builds it before the first feed
        return self.cache

    def catch_up(self, step: DraftStep) -> Feed:
        """What the small model must run before drafting: the tokens its cache lacks (at the first
        step, the prompt after its longest cached prefix)."""
        first = self.cache is None
        if self.cache is None:
            # The prompt's longest cached prefix in this draft model's own namespace of the prefix cache.
            prompt, store = list(step.tokens[: self.request.prompt_len]), self.request.prefix_cache
            n, layers = store.lookup(self.drafter, prompt) if store is not None else (0, None)
            self.cache, self.cached = self.model.new_cache(layers, n), prompt[:n]
        feed = Feed(self.model, list(step.tokens[len(self.cached) :]), self.cache, prefill=first)
        self.cached = list(step.tokens)
        return feed

    def drafted(self, tokens: list[torch.Tensor], probs: list[torch.Tensor | None]) -> Draft:
        """The draft of the tokens drawn (all but the last were fed to the small model)."""
        ids, stacked = finish_draft(tokens, probs)
        self.cached.extend(ids[:-1])
        return Draft(ids, stacked)

    def propose(self, step: DraftStep) -> Draft:
        return self.drafter.propose_many([(self, step)])[0]

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
