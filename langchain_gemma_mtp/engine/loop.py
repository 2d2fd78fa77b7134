"""One request's speculative loop: prefill after the longest cached prefix, then each step
draft -> forward -> verdict -> rollback -> commit, one burst of verified tokens per step.

The loop runs no forward itself: it yields a DraftAsk (sent back the Draft) and a Feed (the tokens
it needs run after its cache; sent back the Forward), so the owner thread (engine/worker.py) can
draft for every request in flight in one batch and verify all their drafts in one batched target
forward (engine/batch.py). A long prompt is fed in chunks, so
requests already streaming keep moving while it prefills.
"""

from __future__ import annotations

from collections.abc import Generator

import torch
from transformers import DynamicCache

from .batch import Feed
from .cache import PrefixCache
from .constraint import open_constraint
from .drafters import NO_DRAFT, Draft, DraftAsk, Drafter, DraftRequest, DraftStep
from .processors import RequestProcessors, row_paths
from .schedule import DraftPolicy
from .target import Forward, TargetModel
from .tree import DraftTree
from .types import Burst, GenerationRequest, SpeculativeStats
from .verify import choose_token, judge

TARGET = "target"  # the target's namespace in the prefix cache
# Prompt tokens per prefill forward. A chunk costs the requests streaming beside it one forward of
# this width per step (benchmarks/batch_bench.py measures the delay); longer chunks gain little.
PREFILL_CHUNK = 256

# What the loop yields: a DraftAsk (it is sent the Draft), a Feed (sent the Forward) or a Burst of
# verified tokens (sent None).
Steps = Generator[DraftAsk | Feed | Burst, Draft | Forward | None, None]


def _finish(new: list[int], produced: int, request: GenerationRequest) -> tuple[list[int], str | None]:
    """Cut a step's tokens at the first stop token (kept) or at max_new_tokens."""
    for i, tok in enumerate(new):
        if tok in request.stop_token_ids:
            return new[: i + 1], "stop"
    room = request.max_new_tokens - produced
    if len(new) >= room:
        return new[:room], "length"
    return new, None


def _tree(draft: Draft, request: GenerationRequest, target: TargetModel) -> DraftTree | None:
    """The draft as a tree when it offers alternatives and the request and model can verify one."""
    if any(draft.alternatives) and request.sampling.greedy and target.verifies_trees:
        return DraftTree(draft.tokens, draft.alternatives)
    return None


def speculative_decode(
    target: TargetModel,
    drafter: Drafter,
    request: GenerationRequest,
    policy: DraftPolicy,
    stats: SpeculativeStats,
    generator: torch.Generator | None,
    prefix_cache: PrefixCache | None = None,
) -> Steps:
    """Yield the draft asks, feeds and bursts of one request; the caller answers each ask with its
    Draft and each feed with its Forward."""
    sampling = request.sampling
    prompt = list(request.prompt_ids)
    # Reuse the longest cached prefix, but feed at least one token: its logits choose the first token.
    reused, layers = prefix_cache.lookup(TARGET, prompt[:-1]) if prefix_cache is not None else (0, None)
    cache = target.new_cache(layers, reused)
    stats.cached_tokens = reused

    # Penalties, bias and min_tokens, when the request sets any: each verified row gets its own history.
    processors = None
    if request.processing.active:
        processors = RequestProcessors(request.processing, prompt, request.stop_token_ids, target.vocab_size, target.device)
    constraint = open_constraint(request, stats)  # a grammar the output must match, or no-op hooks
    # A verdict that needs only each row's argmax lets the batch skip writing out the logits.
    argmax_only = sampling.greedy and processors is None and request.constraint is None
    fwd = yield from _prefill(target, prompt[reused:], cache)
    assert fwd.logits is not None  # the last chunk's row
    logits = fwd.logits[-1]
    if processors is not None:
        logits = processors.apply(logits[None], prompt, [[]])[0]
    logits = constraint.mask(logits[None], [[]])[0]
    first = int(choose_token(logits, sampling, generator)[0])
    stats.target_forwards += 1
    if prefix_cache is not None:  # now, so requests running beside this one reuse the prompt at once
        prefix_cache.insert(TARGET, prompt, cache)
    # The committed sequence; tokens[-1] is pending (chosen, not yet fed). `hidden` and `shared_kv`
    # are the target's state at the token before it: what the next draft starts from.
    tokens = prompt + [first]
    hidden, shared_kv = fwd.hidden[-1:].unsqueeze(0), target.rollback(cache, fwd, 0)
    drafting = DraftRequest(len(prompt), sampling, generator, request.learns, prefix_cache)
    session = drafter.open(drafting)
    new, finish = _finish([first], 0, request)
    new, finish = constraint.commit(new, finish)
    produced = len(new)
    try:
        yield Burst(new, 0, 0, finish)
        while finish is None:
            # Never draft past max_new_tokens: the target adds one token of its own each step.
            room = request.max_new_tokens - produced - 1
            plan = policy.next_plan()
            k = min(plan.k, room)
            # A length the caller fixed is kept; an adaptive one may grow on long n-gram matches.
            limit = k if policy.fixed is not None else room
            step_mtp = (plan.stop_below, plan.siblings, plan.sibling_min_chance)
            draft = NO_DRAFT
            if k > 0:
                step = DraftStep(drafting, tokens, k, limit, hidden, shared_kv, *step_mtp)
                drafted = yield DraftAsk(drafter, session, step, policy.costs)
                assert isinstance(drafted, Draft)  # the worker sends a Draft for a DraftAsk
                draft = drafted
            draft = constraint.draft(draft, room)
            tree = _tree(draft, request, target)
            block = tree.tokens(tokens[-1]) if tree else [tokens[-1], *draft.tokens]
            verified = yield Feed(target, block, cache, tree, costs=policy.costs, greedy=argmax_only)
            assert isinstance(verified, Forward)  # the worker sends a Forward for a Feed
            fwd, scores = verified, verified.logits
            if scores is not None:
                if processors is not None:
                    scores = processors.apply(scores, tokens, row_paths(draft.tokens, tree))
                scores = constraint.mask(scores, row_paths(draft.tokens, tree))
            verdict = judge(scores, draft.tokens, draft.probs, tree, sampling, generator, fwd.argmax)
            shared_kv = target.rollback(cache, fwd, verdict.drop, then=verdict.kept_slot)
            hidden = fwd.hidden[verdict.hidden_row].view(1, 1, -1)

            kept = [*verdict.accepted, verdict.next_token]
            tokens.extend(kept)
            session.commit(tokens, len(verdict.accepted))
            stats.record_step(len(draft), len(verdict.accepted), verdict.siblings_verified)
            policy.observe(len(draft), verdict.chain)
            new, finish = _finish(kept, produced, request)
            new, finish = constraint.commit(new, finish)
            produced += len(new)
            yield Burst(new, len(draft), len(verdict.accepted), finish, verdict.siblings_verified)
    finally:
        session.close(tokens)
        stats.costs = policy.costs.snapshot()
        # Keep what the cache holds (all but the pending token) unless a step failed halfway.
        if prefix_cache is not None and cache.get_seq_length() == len(tokens) - 1:
            prefix_cache.insert(TARGET, tokens[:-1], cache)


def _prefill(target: TargetModel, ids: list[int], cache: DynamicCache) -> Generator[Feed, Draft | Forward | None, Forward]:
    """Feed a prompt in chunks of PREFILL_CHUNK; the last chunk's Forward (logits at its last row)."""
    starts = range(0, len(ids), PREFILL_CHUNK)
    fwd = None
    for start in starts:
        fwd = yield Feed(target, ids[start : start + PREFILL_CHUNK], cache, prefill=True, last=start == starts[-1])
    assert isinstance(fwd, Forward)  # a prompt feeds at least one token
    return fwd
