"""Gemma 4 MTP drafter: the assistant reads the target's K/V and last hidden state, no cache of its own."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from ..head import centroid_candidates, project
from ..target import TargetModel
from .base import DecodeState, StatelessDrafter, draft_token, finish_draft


class MTPDrafter(StatelessDrafter):
    """Drafts k tokens from one constant position: the pending token's.

    Step i feeds cat(embed(token), h) where h starts as the target's hidden state before the
    pending token and then is the assistant's own projected state; attention reads the target's
    K/V up to (not including) the pending token. Rejected drafts never enter that K/V.
    """

    name = "mtp"
    cost_per_draft_token = 0.1

    def __init__(self, assistant: PreTrainedModel, target: TargetModel):
        self.assistant = assistant
        self.target = target

    def propose(self, state: DecodeState, k: int) -> tuple[list[int], torch.Tensor | None]:
        if k <= 0 or state.shared_kv is None:
            return [], None
        device = self.target.device
        position = torch.tensor([[len(state.tokens) - 1]], device=device)
        token, h = torch.tensor([[state.tokens[-1]]], device=device), state.hidden
        drafts, probs = [], []
        for _ in range(k):
            last, h = self._step(token, h, position, state.shared_kv)
            token, q = self._choose(last[0, -1], state)
            drafts.append(token)
            probs.append(q)
        return finish_draft(drafts, probs)

    def _step(self, token: torch.Tensor, h: torch.Tensor, position: torch.Tensor, shared_kv) -> tuple[torch.Tensor, torch.Tensor]:
        """The assistant's forward without its head: (normed last state, projected state for the next step)."""
        a = self.assistant
        x = a.pre_projection(torch.cat([self.target.embed(token), h], dim=-1))
        masks = a.create_attention_masks(x, None, shared_kv)
        last = a.model(inputs_embeds=x, attention_mask=masks, position_ids=position, shared_kv_states=shared_kv,
                       use_cache=False).last_hidden_state
        return last, a.post_projection(last)

    def _choose(self, last: torch.Tensor, state: DecodeState) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft token from the head. A centroid head scores only its top clusters' tokens, so
        greedy drafting takes the best of those, and sampling draws from them (q is 0 elsewhere:
        any q keeps the rejection rule exact); transformers instead builds a vocabulary-sized row."""
        weight = self.assistant.lm_head.weight
        embedder = self.assistant.masked_embedding
        if embedder is None:
            return draft_token(project(last, weight), state)
        ids, logits = centroid_candidates(embedder, last, weight)
        if state.sampling.greedy:
            return ids[logits.argmax()].view(1, 1), None
        full = torch.full((weight.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device)
        return draft_token(full.scatter_(0, ids, logits), state)
