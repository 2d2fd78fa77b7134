"""Gemma 4 MTP drafter: the assistant reads the target's K/V and last hidden state, no cache of its own."""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from transformers import Gemma4AssistantForCausalLM, PreTrainedModel

from ...draft_settings import (
    DEFAULT_MTP_SIBLINGS,
    DEFAULT_MTP_STOP_BELOW,
    MTP_SIBLING_MIN_CHANCE,
    check_mtp_siblings,
    check_mtp_stop_below,
)
from ..head import centroid_candidates
from ..matmul import measure_linears
from ..target import KV, TargetModel
from .base import NO_DRAFT, Draft, DraftRequest, DraftSession, DraftStep, StatelessDrafter, draft_token, finish_draft


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
        measure_linears(self.assistant)

    def propose(self, step: DraftStep) -> Draft:
        return self.propose_many([(self, step)])[0]

    def propose_many(self, items: Sequence[tuple[DraftSession, DraftStep]]) -> list[Draft]:
        """Drafts for several requests at once: each assistant step runs over all of them in one
        batched forward (each request's K/V padded to the longest, its padding masked), until every
        request has its k tokens or stopped early."""
        drafts = [NO_DRAFT] * len(items)
        live = [i for i, (_, step) in enumerate(items) if step.k > 0 and step.shared_kv is not None]
        if not live:
            return drafts
        steps = [items[i][1] for i in live]
        device = self.target.device
        position = torch.tensor([[len(s.tokens) - 1] for s in steps], device=device)
        token = torch.tensor([[s.tokens[-1]] for s in steps], device=device)
        h = torch.cat([cast(torch.Tensor, s.hidden) for s in steps])  # the target hands its hidden state with its K/V
        runs = [_Drafting(s, self) for s in steps]
        shared_kv, masks = None, None  # every step of a draft attends to the same K/V from the same position
        for _ in range(max(s.k for s in steps)):
            if shared_kv is None:
                shared_kv, masks = self._batch_kv(steps, token, h)
            last, h, masks = self._step(token, h, position, shared_kv, masks)
            chosen = [run.take(last[j, -1]) if run.going else None for j, run in enumerate(runs)]
            if not any(run.going for run in runs):
                break
            # A request that stopped keeps a row (its last token) so the batch's shapes stay fixed.
            token = torch.cat([c if c is not None else token[j : j + 1] for j, c in enumerate(chosen)])
        for i, run in zip(live, runs):
            drafts[i] = run.draft()
        return drafts

    def _batch_kv(self, steps: list[DraftStep], token: torch.Tensor, h: torch.Tensor) -> tuple[KV, dict | None]:
        """The requests' K/V as one batch and the masks of one step over it: each request's own
        (as `create_attention_masks` builds them alone), padded at the end with masked keys."""
        kvs = [cast(KV, s.shared_kv) for s in steps]
        if len(steps) == 1:
            return kvs[0], None
        a = self.assistant
        x = a.pre_projection(torch.cat([self.target.embed(token), h], dim=-1))
        alone = [a.create_attention_masks(x[j : j + 1], None, kv) for j, kv in enumerate(kvs)]
        masks = {}
        for layer_type in alone[0]:
            rows = [_as_bool(m[layer_type], kv[layer_type][0]) for m, kv in zip(alone, kvs)]
            mask = _pad_keys(rows, False)
            if a.config.get_text_config()._attn_implementation == "eager":  # additive, in the assistant's dtype
                mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)
            masks[layer_type] = mask
        shared = {t: (_pad_keys([kv[t][0] for kv in kvs], 0.0), _pad_keys([kv[t][1] for kv in kvs], 0.0)) for t in kvs[0]}
        return shared, masks

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

    def choose(
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
            logits = F.linear(last, weight)
        else:
            ids, logits = centroid_candidates(embedder, last, weight)
            if request.sampling.greedy:
                return ids[logits.argmax()].view(1, 1), None, logits, ids
            logits = torch.full((weight.shape[0],), float("-inf"), dtype=logits.dtype, device=logits.device).scatter_(0, ids, logits)
        token, q = draft_token(logits, request)
        return token, q, logits if q is None else None, None


class _Drafting:
    """One request's draft as the assistant's steps come in: its tokens, their probabilities, the
    siblings offered at each depth, and whether it goes on (k not reached, chance above stop_below)."""

    def __init__(self, step: DraftStep, drafter: MTPDrafter):
        self.step = step
        self.drafter = drafter
        self.stop_below, self.siblings, self.least = drafter._settings(step)
        self.tokens: list[torch.Tensor] = []
        self.probs: list[torch.Tensor | None] = []
        self.chance = 1.0
        self.offered: list[tuple[float, list[float], torch.Tensor]] = []
        self.going = True

    def take(self, last: torch.Tensor) -> torch.Tensor:
        """The next draft token (1, 1) from the assistant's state `last`."""
        drafter = self.drafter
        token, q, scores, ids = drafter.choose(last, self.step.request)
        self.tokens.append(token)
        self.probs.append(q)
        self.going = len(self.tokens) < self.step.k
        if not (self.stop_below or (q is None and self.siblings)):
            return token
        # One host sync per draft step: the drafter's own probabilities of its best tokens.
        if q is None:
            assert scores is not None  # choose returns the scores whenever q is None
            top = torch.softmax(scores.float(), -1).topk(min(self.siblings + 1, scores.shape[-1]))
            best = top.values.tolist()
            self.offered.append((self.chance, best, ids[top.indices] if ids is not None else top.indices))
            self.chance *= best[0]
        else:
            self.chance *= float(q[token.view(-1)[0]])
        if self.chance < self.stop_below:
            self.going = False
        return token

    def draft(self) -> Draft:
        tokens, stacked = finish_draft(self.tokens, self.probs)
        siblings = self.siblings
        if not (self.offered and siblings):
            return Draft(tokens, stacked)
        # The candidates' ids in one more sync; a tie may put the chosen one anywhere.
        alternatives = [
            [t for t, p in zip(candidates, best) if t != chosen and before * p >= self.least][:siblings]
            for chosen, (before, best, _), candidates in zip(tokens, self.offered, torch.stack([o[2] for o in self.offered]).tolist())
        ]
        return Draft(tokens, stacked, alternatives)


def _as_bool(mask: torch.Tensor | None, keys: torch.Tensor) -> torch.Tensor:
    """An assistant mask over one request's `keys` as (1, 1, 1, L) bool: None (all keys) or additive made plain."""
    if mask is None:
        return torch.ones(1, 1, 1, keys.shape[-2], dtype=torch.bool, device=keys.device)
    return mask if mask.dtype == torch.bool else mask == 0


def _pad_keys(rows: list[torch.Tensor], fill: float | bool) -> torch.Tensor:
    """(1, ..., L_i, D_or_L) per request as one (B, ..., max L_i, ...) along the key axis (-2 for K/V, -1 for masks)."""
    axis = -1 if rows[0].dtype == torch.bool else -2
    longest = max(r.shape[axis] for r in rows)
    padded = []
    for r in rows:
        gap = longest - r.shape[axis]
        if gap:
            shape = list(r.shape)
            shape[axis] = gap
            r = torch.cat([r, torch.full(shape, fill, dtype=r.dtype, device=r.device)], dim=axis)
        padded.append(r)
    return torch.cat(padded)
