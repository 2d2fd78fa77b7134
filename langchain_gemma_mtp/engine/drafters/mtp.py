"""Gemma 4 MTP drafter: the assistant reads the target's K/V and last hidden state, no cache of its own."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

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
            out = self.assistant(
                inputs_embeds=torch.cat([self.target.embed(token), h], dim=-1),
                position_ids=position,
                shared_kv_states=state.shared_kv,
            )
            token, q = draft_token(out.logits[0, -1], state)
            h = out.last_hidden_state
            drafts.append(token)
            probs.append(q)
        return finish_draft(drafts, probs)
