"""Gemma 4 MTP drafter: the assistant reads the target's K/V and last hidden state, no cache of its own."""

from __future__ import annotations

from typing import cast

import torch
from transformers import Gemma4AssistantForCausalLM, PreTrainedModel

from ...draft_settings import (
    DEFAULT_MTP_SIBLINGS,
    DEFAULT_MTP_STOP_BELOW,
    MTP_SIBLING_MIN_CHANCE,
    check_mtp_siblings,
    check_mtp_stop_below,
)
from ..head import centroid_candidates, project
from ..target import TargetModel
from .base import NO_DRAFT, Draft, DraftRequest, DraftStep, StatelessDrafter, draft_token, finish_draft


class MTPDrafter(StatelessDrafter):
    """Drafts up to k tokens from one constant position: the pending token's.

    Step i feeds cat(embed(token), h) where h starts as the target's hidden state before the
    pending token and then is the assistant's own projected state; attention reads the target's
    K/V up to (not including) the pending token. Rejected drafts never enter that K/V.

    Drafting stops early once the product of the drafter's own probabilities for its tokens so far
    falls below `stop_below`: the chance that the next draft is still accepted is then too small
    to pay for its step and its verification. The stop depends only on the drafts already made,
    so greedy output and the sampled distribution are unchanged; 0 always drafts k.

    Greedy requests also get up to `siblings_per_depth` runners-up ("siblings") at each depth
    (the draft's `alternatives`), each at least MTP_SIBLING_MIN_CHANCE likely to be accepted, which
    the loop verifies beside the chain as a tree: where the target rejects a draft token but chose
    a sibling, that step keeps one more token. Sampled requests verify the chain alone.

    `stop_below`, `siblings_per_depth` and `sibling_min_chance` given here are kept; left None, each
    step takes the schedule's choice from the engine's measured costs (`DraftStep`), or the tuned
    defaults (DEFAULT_MTP_STOP_BELOW, DEFAULT_MTP_SIBLINGS, MTP_SIBLING_MIN_CHANCE) when it has none.

    Building one pairs the assistant with the target (`TargetModel.pair`): the target hands it the
    K/V layers it reads and, where it shares it, its LM head.
    """

    name = "mtp"
    cost_per_draft_token = 0.1
    sibling_min_chance: float | None = None

    def __init__(
        self,
        assistant: PreTrainedModel,
        target: TargetModel,
        stop_below: float | None = None,
        siblings_per_depth: int | None = None,
    ):
        self.stop_below = None if stop_below is None else check_mtp_stop_below(stop_below)
        self.siblings_per_depth = None if siblings_per_depth is None else check_mtp_siblings(siblings_per_depth)
        # An MTP assistant checkpoint loads as this class; the drafter calls its parts directly.
        self.assistant = cast(Gemma4AssistantForCausalLM, assistant)
        self.target = target
        target.pair(assistant)

    def propose(self, step: DraftStep) -> Draft:
        if step.k <= 0 or step.shared_kv is None:
            return NO_DRAFT
        assert step.hidden is not None  # the target hands its hidden state with its K/V
        request = step.request
        device = self.target.device
        position = torch.tensor([[len(step.tokens) - 1]], device=device)
        token, h = torch.tensor([[step.tokens[-1]]], device=device), step.hidden
        stop_below, siblings, least = self._settings(step)
        drafts, probs, chance, offered = [], [], 1.0, []
        masks = None  # every step of a draft attends to the same K/V from the same position
        for _ in range(step.k):
            last, h, masks = self._step(token, h, position, step.shared_kv, masks)
            token, q, scores, ids = self._choose(last[0, -1], request)
            drafts.append(token)
            probs.append(q)
            if not (stop_below or (q is None and siblings)):
                continue
            # One host sync per draft step: the drafter's own probabilities of its best tokens.
            if q is None:
                assert scores is not None  # _choose returns the scores whenever q is None
                top = torch.softmax(scores.float(), -1).topk(min(siblings + 1, scores.shape[-1]))
                best = top.values.tolist()
                offered.append((chance, best, ids[top.indices] if ids is not None else top.indices))
                chance *= best[0]
            else:
                chance *= float(q[token.view(-1)[0]])
            if chance < stop_below:
                break
        tokens, stacked = finish_draft(drafts, probs)
        if not (offered and siblings):
            return Draft(tokens, stacked)
        # The candidates' ids in one more sync; a tie may put the chosen one anywhere.
        alternatives = [
            [t for t, p in zip(candidates, best) if t != chosen and before * p >= least][:siblings]
            for chosen, (before, best, _), candidates in zip(tokens, offered, torch.stack([o[2] for o in offered]).tolist())
        ]
        return Draft(tokens, stacked, alternatives)

    def _settings(self, step: DraftStep) -> tuple[float, int, float]:
        """(stop_below, siblings per depth, a sibling's least chance): this drafter's own where given,
        else the step's (the schedule's), else the defaults."""

        def pick(own, planned, default):
            return own if own is not None else planned if planned is not None else default

        return (
            pick(self.stop_below, step.stop_below, DEFAULT_MTP_STOP_BELOW),
            pick(self.siblings_per_depth, step.siblings, DEFAULT_MTP_SIBLINGS),
            pick(self.sibling_min_chance, step.sibling_min_chance, MTP_SIBLING_MIN_CHANCE),
        )

    def _step(
        self, token: torch.Tensor, h: torch.Tensor, position: torch.Tensor, shared_kv, masks: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The assistant's forward without its head: (normed last state, projected state for the next
        step, the attention masks it used, for the next step to reuse)."""
        a = self.assistant
        x = a.pre_projection(torch.cat([self.target.embed(token), h], dim=-1))
        if masks is None:
            masks = a.create_attention_masks(x, None, shared_kv)
        last = a.model(
            inputs_embeds=x, attention_mask=masks, position_ids=position, shared_kv_states=shared_kv, use_cache=False
        ).last_hidden_state
        return last, a.post_projection(last), masks

    def _choose(
        self, last: torch.Tensor, request: DraftRequest
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The draft token, the distribution it was sampled from (None when greedy) and, when
        greedy, the logits it was the best of with their token ids (None: the whole vocabulary).
        A centroid head scores only its top clusters' tokens, so greedy drafting takes the best of
        those, and sampling draws from them (q is 0 elsewhere: any q keeps the rejection rule
        exact); transformers instead builds a vocabulary-sized row."""
        weight = self.assistant.lm_head.weight
        embedder = self.assistant.masked_embedding
        if embedder is None:
            logits = project(last, weight)
        else:
            ids, logits = centroid_candidates(embedder, last, weight)
            if request.sampling.greedy:
                return ids[logits.argmax()].view(1, 1), None, logits, ids
            logits = torch.full((weight.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device).scatter_(0, ids, logits)
        token, q = draft_token(logits, request)
        return token, q, logits if q is None else None, None
