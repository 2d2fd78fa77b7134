"""One request's speculative loop: prefill after the longest cached prefix, then draft -> verify -> roll
back, one burst per step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .cache import PrefixCache
from .drafters import DecodeState, Drafter
from .processors import RequestProcessors, row_paths
from .schedule import DraftPolicy
from .target import TargetModel
from .tree import DraftTree
from .types import Burst, GenerationRequest, SpeculativeStats
from .verify import choose_token, process_logits, verify_greedy, verify_sampled

TARGET = "target"  # the target's namespace in the prefix cache


def _finish(new: list[int], produced: int, request: GenerationRequest) -> tuple[list[int], str | None]:
    """Cut a step's tokens at the first stop token (kept) or at max_new_tokens."""
    for i, tok in enumerate(new):
        if tok in request.stop_token_ids:
            return new[: i + 1], "stop"
    room = request.max_new_tokens - produced
    if len(new) >= room:
        return new[:room], "length"
    return new, None


def speculative_decode(
    target: TargetModel,
    drafter: Drafter,
    request: GenerationRequest,
    policy: DraftPolicy,
    stats: SpeculativeStats,
    generator: torch.Generator | None,
    prefix_cache: PrefixCache | None = None,
) -> Iterator[Burst]:
    """Yield bursts of verified tokens for one request; the caller holds the model."""
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
    fwd = target.forward(prompt[reused:], cache, prefill=True)
    logits = target.logits(fwd.hidden[-1])
    if processors is not None:
        logits = processors.apply(logits[None], prompt, [[]])[0]
    first = int(choose_token(logits, sampling, generator)[0])
    stats.target_forwards += 1
    if prefix_cache is not None:  # now, so requests running beside this one reuse the prompt at once
        prefix_cache.insert(TARGET, prompt, cache)
    state = DecodeState(
        tokens=prompt + [first],
        prompt_len=len(prompt),
        hidden=fwd.hidden[-1:].unsqueeze(0),
        shared_kv=target.rollback(cache, fwd, 0),
        sampling=sampling,
        generator=generator,
        prefix_cache=prefix_cache,
        reproducible=request.seed is not None and not sampling.greedy,
    )
    new, finish = _finish([first], 0, request)
    produced = len(new)
    drafter.start(state)
    try:
        yield Burst(new, 0, 0, finish)
        while finish is None:
            # Never draft past max_new_tokens: the target adds one token of its own each step.
            room = request.max_new_tokens - produced - 1
            k = min(policy.next_length(), room)
            # A length the caller fixed is kept; an adaptive one may grow on long n-gram matches.
            state.draft_limit = room if policy.fixed is None else k
            state.siblings = []
            draft, draft_probs = drafter.propose(state, k) if k > 0 else ([], None)
            tree = DraftTree(draft, state.siblings) if any(state.siblings) and sampling.greedy and target.verifies_trees else None
            fwd = target.forward(tree.tokens(state.tokens[-1]) if tree else [state.tokens[-1]] + draft, cache, tree=tree)
            logits = target.logits(fwd.hidden)
            if processors is not None:
                logits = processors.apply(logits, state.tokens, row_paths(draft, tree))
            if sampling.greedy:  # `sibling`: the slot of an accepted sibling, if any
                accepted, nxt, sibling = verify_greedy(logits, draft, tree)
            else:
                n, nxt = verify_sampled(process_logits(logits, sampling), draft, draft_probs, generator)
                accepted, sibling = draft[:n], None
            chain = len(accepted) - (sibling is not None)  # chain tokens kept
            verified = tree.width - 1 if tree else len(draft)
            state.shared_kv = target.rollback(cache, fwd, verified - chain, then=sibling)
            state.hidden = fwd.hidden[chain if sibling is None else sibling].view(1, 1, -1)
            stats.record_step(len(draft), len(accepted), verified - len(draft))
            policy.observe(len(draft), chain)

            new, finish = _finish(accepted + [nxt], produced, request)
            state.tokens.extend(accepted + [nxt])
            drafter.commit(state, len(accepted))
            produced += len(new)
            yield Burst(new, len(draft), len(accepted), finish, verified - len(draft))
    finally:
        drafter.finish(state)
        # Keep what the cache holds (all but the pending token) unless a step failed halfway.
        if prefix_cache is not None and cache.get_seq_length() == len(state.tokens) - 1:
            prefix_cache.insert(TARGET, state.tokens[:-1], cache)
