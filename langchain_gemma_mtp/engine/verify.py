"""Verification of drafts by the target: greedy prefix match and lossless rejection sampling, and
the verdict the loop acts on."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .head import greedy_ids
from .tree import DraftTree
from .types import SamplingParams


def process_logits(logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
    """Return float32 probabilities after temperature, min-p, top-k and top-p, row by row (vLLM's order).

    The same processing is applied to target and drafter logits, so that the
    rejection rule compares the distributions that are really sampled from.
    """
    scores = logits.float() / sampling.temperature
    if sampling.min_p > 0.0:
        # Keep tokens with probability >= min_p * the top one's: a threshold on the scores.
        top = scores.max(-1, keepdim=True).values
        scores = scores.masked_fill(scores < top + math.log(sampling.min_p), float("-inf"))
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cum - sorted_scores.softmax(-1)) >= sampling.top_p
        drop_sorted[..., 0] = False  # also when top_p underflows float32 to 0
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores.softmax(-1)


def verify_greedy(preds: list[int], draft: list[int], tree: DraftTree | None = None) -> tuple[list[int], int, int | None]:
    """Accept the longest draft prefix equal to the target's argmax; return (accepted tokens, next
    token, the slot of an accepted sibling or None).

    `preds` holds the target's argmax per fed token: after the pending token and after each draft
    token (then after each sibling, with `tree`). Where the chain fails, a sibling equal to the
    target's own token there is accepted, and its row gives the next token.
    """
    n = 0
    while n < len(draft) and draft[n] == preds[n]:
        n += 1
    slot = tree.sibling_slot(n + 1, preds[n]) if tree is not None else None
    if slot is None:
        return draft[:n], preds[n], None
    return [*draft[:n], preds[n]], preds[slot], slot


def verify_sampled(
    target_probs: torch.Tensor,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Leviathan et al. speculative sampling; return (n_accepted, next_token).

    Draft token x_i is accepted with probability min(1, p_i(x_i) / q_i(x_i)); at the first
    rejection the next token is drawn from norm(max(0, p_i - q_i)); after a full accept a bonus
    token is drawn from p_k. A deterministic drafter passes `draft_probs=None`: q is then a point
    mass, so acceptance is p(d) and the residual is p with d removed; the same formula covers it.
    """
    k = len(draft)
    p = target_probs
    n = k
    if k:
        d = torch.tensor(draft, device=p.device)
        q = draft_probs if draft_probs is not None else torch.nn.functional.one_hot(d, p.shape[-1]).to(p.dtype)
        rows = torch.arange(k, device=p.device)
        px, qx = p[rows, d], q[rows, d].to(p.dtype)
        r = torch.rand(k, generator=generator, device=p.device)
        rejected = (r * qx >= px).nonzero()
        if rejected.numel():
            n = int(rejected[0, 0])
            residual = (p[n] - q[n].to(p.dtype)).clamp_min(0.0)
            total = residual.sum()
            # A rejection implies p(x) < q(x), hence mass elsewhere; guard against rounding to zero.
            dist = residual / total if total > 0 else p[n]
            return n, int(torch.multinomial(dist, 1, generator=generator))
    return n, int(torch.multinomial(p[n], 1, generator=generator))


def choose_token(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token from a single row of logits, greedy or sampled, as a (1, 1) tensor on the logits'
    device (no host sync), with the processed probabilities it was drawn from (None when greedy)."""
    if sampling.greedy:
        return greedy_ids(logits).view(1, 1), None
    probs = process_logits(logits, sampling)
    return torch.multinomial(probs, 1, generator=generator).view(1, 1), probs


@dataclass(frozen=True)
class Verdict:
    """What one verify forward decided, in the terms the loop acts on.

    The forward fed the pending token, the draft chain and (with a tree) the siblings: `drop` of
    those rows leave the cache, and `kept_slot` (an accepted sibling) is put back after what stays.
    `hidden_row` is the row whose hidden state the next draft starts from.
    """

    accepted: list[int]  # draft positions kept (the last may be a sibling in its chain token's place)
    next_token: int  # the target's own token after them
    drop: int
    kept_slot: int | None
    hidden_row: int
    siblings_verified: int  # rows verified beside the chain

    @property
    def chain(self) -> int:
        """Tokens of the draft chain itself that were kept."""
        return len(self.accepted) - (self.kept_slot is not None)


def judge(
    logits: torch.Tensor | None,
    draft: list[int],
    draft_probs: torch.Tensor | None,
    tree: DraftTree | None,
    sampling: SamplingParams,
    generator: torch.Generator | None,
    argmax: torch.Tensor | None = None,
) -> Verdict:
    """The verdict on a draft from the target's logits (a row per fed token): greedy prefix match
    (with siblings when `tree`), or speculative sampling on the processed distributions. A greedy
    request whose forward gave only each row's `argmax` (engine/batch.py) passes that instead."""
    if sampling.greedy and argmax is not None:
        accepted, next_token, slot = verify_greedy(argmax.tolist(), draft, tree)
    elif logits is None:
        raise ValueError("a verdict needs the forward's logits, or each row's argmax for a greedy request")
    elif sampling.greedy:
        accepted, next_token, slot = verify_greedy(greedy_ids(logits).tolist(), draft, tree)
    else:
        n, next_token = verify_sampled(process_logits(logits, sampling), draft, draft_probs, generator)
        accepted, slot = draft[:n], None
    chain = len(accepted) - (slot is not None)
    verified = tree.width - 1 if tree is not None else len(draft)
    return Verdict(accepted, next_token, verified - chain, slot, chain if slot is None else slot, verified - len(draft))
