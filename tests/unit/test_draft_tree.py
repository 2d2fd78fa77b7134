"""Greedy draft trees (a chain plus siblings at each depth): layout, masks, cache rollback, exact output."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, WINDOW, build_target

from langchain_gemma_mtp.draft_settings import check_mtp_siblings
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import NO_DRAFT, Draft, StatelessDrafter
from langchain_gemma_mtp.engine.drafters.mtp import MTPDrafter
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine.tree import DraftTree
from langchain_gemma_mtp.errors import InvalidRequestError

NEW_TOKENS = 40


def prompt(seed: int, length: int = 30) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, VOCAB, (length - 1,), generator=g).tolist()


def plain_greedy(target: TargetModel, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = target.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_layout_of_a_chain_with_siblings():
    tree = DraftTree([10, 11, 12], [[20, 21], [], [22]])
    assert tree.tokens(9) == [9, 10, 11, 12, 20, 21, 22]
    assert tree.width == 7
    assert tree.depths() == [0, 1, 2, 3, 1, 1, 3]
    assert tree.parents() == [-1, 0, 1, 2, 0, 0, 2]
    seen = tree.ancestry()
    assert seen[3].tolist() == [True, True, True, True, False, False, False]  # chain[2]: the whole chain
    assert seen[5].tolist() == [True, False, False, False, False, True, False]  # a depth-1 sibling: pending + itself
    assert seen[6].tolist() == [True, True, True, False, False, False, True]  # a depth-3 sibling: chain[:2] + itself
    assert (tree.sibling_slot(1, 21), tree.sibling_slot(3, 22), tree.sibling_slot(2, 20), tree.sibling_slot(4, 22)) == (5, 6, None, None)


@pytest.fixture(scope="module", params=["gemma3", "shared_ple", "conditional", "eager"])
def target(request) -> TargetModel:
    """Each kind of tiny target; `eager`: Gemma 3 with eager attention (additive masks)."""
    model = build_target("gemma3" if request.param == "eager" else request.param)
    if request.param == "eager":
        model.set_attn_implementation("eager")
    return TargetModel(model)


def test_each_node_sees_exactly_its_path(target):
    """Hidden states of a tree's nodes, past the sliding window, equal feeding each node's path as a chain,
    and rolling back to a sibling leaves the cache and the drafter's K/V a chain forward would."""
    ids = prompt(5, length=3 * WINDOW)
    tree = DraftTree([40, 41, 42], [[50, 51], [52], [53]])
    paths = {1: [40], 2: [40, 41], 3: [40, 41, 42], 4: [50], 5: [51], 6: [40, 52], 7: [40, 41, 53]}
    with torch.no_grad():
        cache = target.new_cache()
        target.forward(ids[:-1], cache, prefill=True)
        fwd = target.forward(tree.tokens(ids[-1]), cache, tree=tree)
        for slot, path in paths.items():
            torch.testing.assert_close(fwd.hidden[slot], fed_path(target, ids, path)[1].hidden[-1], atol=1e-4, rtol=1e-4)
        # Keep pending, chain[0], then sibling 52 (slot 6): the state of feeding [pending, 40, 52].
        kv = target.rollback(cache, fwd, tree.width - 2, then=6)
        ref_cache, ref_fwd = fed_path(target, ids, [40, 52])
        ref_kv = target.rollback(ref_cache, ref_fwd, 0)
        assert cache.get_seq_length() == ref_cache.get_seq_length() == len(ids) + 2
        assert kv.keys() == ref_kv.keys()
        for layer_type in kv:
            for got, want in zip(kv[layer_type], ref_kv[layer_type]):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(target.forward([7], cache).hidden[-1], target.forward([7], ref_cache).hidden[-1], atol=1e-4, rtol=1e-4)


def fed_path(target: TargetModel, ids: list[int], path: list[int]):
    """(cache, forward) after prefilling `ids[:-1]` and feeding the pending token and `path` as a chain."""
    cache = target.new_cache()
    target.forward(ids[:-1], cache, prefill=True)
    return cache, target.forward([ids[-1], *path], cache)


class TreeScript(StatelessDrafter):
    """Drafts the true continuation with one token wrong, at a depth that cycles 1..k, and puts the true
    token among decoy siblings there: every step must accept that sibling and use its row."""

    name, cost_per_draft_token = "tree-script", 0.1

    def __init__(self, continuation: list[int]):
        self.continuation, self.steps = continuation, 0

    def propose(self, step):
        done = len(step.tokens) - step.request.prompt_len
        chain = self.continuation[done : done + step.k]
        if not chain:
            return NO_DRAFT
        miss = self.steps % len(chain)
        self.steps += 1
        true = chain[miss]
        chain = [*chain[:miss], (true + 1) % VOCAB, *chain[miss + 1 :]]
        alternatives = [[] for _ in chain]
        alternatives[miss] = [(true + 2) % VOCAB, true, (true + 3) % VOCAB]
        return Draft(chain, None, alternatives)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_accepted_siblings_keep_greedy_output_exact(target, k):
    ids = prompt(11)
    ref = plain_greedy(target, ids, NEW_TOKENS)
    engine = Engine(target.model, TreeScript(ref))
    result = engine.generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[])
    assert result.token_ids == ref
    # Each step keeps the chain before the miss, then the sibling in its place (its row gives the next token).
    expected_accepted = expected_siblings = 0
    for step, d in enumerate(d for d in result.stats.draft_lengths if d):
        expected_accepted += step % d + 1
        expected_siblings += 3
    assert (result.stats.accepted, result.stats.sibling_tokens) == (expected_accepted, expected_siblings)
    assert (engine.counters.accepted_tokens, engine.counters.sibling_tokens) == (expected_accepted, expected_siblings)


def test_sampled_requests_verify_the_chain_alone(target):
    """Siblings are a greedy rule: under sampling the drafter's siblings are ignored (the rejection rule
    covers one draft per position), and the output is the same as without them."""
    ids = prompt(12)
    ref = plain_greedy(target, ids, NEW_TOKENS)
    sampling = {"temperature": 0.8, "seed": 3, "max_new_tokens": 20, "num_draft_tokens": 3, "stop_token_ids": []}
    with_tree = Engine(target.model, TreeScript(ref)).generate(ids, **sampling)
    assert with_tree.stats.sibling_tokens == 0
    assert with_tree.token_ids == Engine(target.model, ChainOf(TreeScript(ref))).generate(ids, **sampling).token_ids


class ChainOf(StatelessDrafter):
    """The same drafts without siblings."""

    def __init__(self, inner):
        self.inner, self.name, self.cost_per_draft_token = inner, "chain", 0.1

    def propose(self, step):
        return Draft(self.inner.propose(step).tokens)


def test_mtp_drafter_offers_siblings_only_when_greedy(checkpoints):
    engine = Engine.from_pretrained(checkpoints["noshare"], drafter="mtp")
    drafter: MTPDrafter = engine.drafter
    drafter.stop_below, drafter.siblings_per_depth, drafter.sibling_min_chance = 0.0, 3, 0.0
    ids = prompt(13)
    with torch.no_grad():
        greedy = engine.generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=[])
        assert greedy.token_ids == plain_greedy(engine.target, ids, NEW_TOKENS)
        assert greedy.stats.sibling_tokens == 3 * sum(greedy.stats.draft_lengths)  # every depth, 3 each
        sampled = engine.generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=4, temperature=0.7, seed=1, stop_token_ids=[])
        assert sampled.stats.sibling_tokens == 0
        drafter.sibling_min_chance = 1.0  # no untrained guess is that sure
        assert engine.generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=[]).stats.sibling_tokens == 0


@pytest.mark.parametrize("value", [-1, 9, 1.5, True, "2"])
def test_bad_sibling_counts_name_the_range(value):
    with pytest.raises(InvalidRequestError, match=r"siblings must be an int in \[0, 8\]"):
        check_mtp_siblings(value)
