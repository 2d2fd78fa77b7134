"""Cross-call prefix cache: requests that share a prefix prefill only the rest, and stay exact (fp32)."""

from __future__ import annotations

import pytest
import torch
from test_engine_greedy import hf_greedy, prompt
from tiny_models import WINDOW, build_target

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.cache import GROW, PrefixCache, common_prefix_length, kv_layers
from langchain_gemma_mtp.engine.drafters import DraftModelDrafter, NgramDrafter, NoDrafter
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.errors import InvalidRequestError


@pytest.fixture(scope="module")
def targets(checkpoints) -> dict[str, object]:
    return {kind: Engine.from_pretrained(path, drafter="none").model for kind, path in checkpoints.items()}


def count_fed_tokens(model) -> list[int]:
    """Tokens fed to the model per forward, recorded by a hook on its decoder."""
    fed: list[int] = []
    model.get_decoder().register_forward_hook(lambda mod, args, kwargs, out: fed.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    return fed


@pytest.mark.parametrize("kind", ["shared_ple", "noshare", "conditional", "gemma3"])
@pytest.mark.parametrize("drafter", ["mtp", "hybrid", "ngram", "draft_model"])
def test_agent_like_turns_reuse_the_prefix_and_match_plain_greedy(checkpoints, targets, kind, drafter):
    """Turn 2 extends turn 1's prompt and part of its answer; turn 3 shares only the start of the
    conversation, so every sliding layer must be cropped far behind its window (8)."""
    path = checkpoints[kind]
    if drafter == "draft_model":
        engine = Engine(Engine.from_pretrained(path, drafter="none").model, DraftModelDrafter(TargetModel(build_target("noshare", seed=7))))
    else:
        engine = Engine.from_pretrained(path, drafter=drafter)
    fed = count_fed_tokens(engine.model)
    plain = targets[kind]
    turn1 = prompt(31, length=40)
    first = engine.generate(turn1, max_new_tokens=30, num_draft_tokens=3, stop_token_ids=[])
    assert first.token_ids == hf_greedy(plain, turn1, 30) and first.stats.cached_tokens == 0

    turn2 = turn1 + first.token_ids[:20] + prompt(32, length=6)[1:]
    fed.clear()
    second = engine.generate(turn2, max_new_tokens=24, num_draft_tokens=3, stop_token_ids=[])
    assert second.token_ids == hf_greedy(plain, turn2, 24)
    assert second.stats.cached_tokens == len(turn1) + 20
    assert fed[0] == len(turn2) - second.stats.cached_tokens == 5  # the prefill fed only the new tokens

    turn3 = turn2[:12] + prompt(33, length=10)[1:]
    assert 12 < len(turn2) - WINDOW
    third = engine.generate(turn3, max_new_tokens=24, num_draft_tokens=3, stop_token_ids=[])
    assert third.stats.cached_tokens == 12
    assert third.token_ids == hf_greedy(plain, turn3, 24)

    repeat = engine.generate(turn3, max_new_tokens=24, num_draft_tokens=3, stop_token_ids=[])
    assert repeat.stats.cached_tokens == len(turn3) - 1  # one token is always fed for the first logits
    assert repeat.token_ids == third.token_ids
    if drafter == "draft_model":  # the draft model reuses its own cache too, in its own namespace
        assert engine.prefix_cache.lookup(engine.drafter, turn3)[0] == len(turn3)


def test_without_a_prefix_cache_nothing_is_reused(checkpoints, targets):
    engine = Engine.from_pretrained(checkpoints["gemma3"], drafter="ngram", prefix_cache_mb=0)
    ids = prompt(34, length=30)
    for _ in range(2):
        result = engine.generate(ids, max_new_tokens=10, stop_token_ids=[])
        assert result.stats.cached_tokens == 0 and result.token_ids == hf_greedy(targets["gemma3"], ids, 10)
    assert len(engine.prefix_cache) == 0
    with pytest.raises(InvalidRequestError, match="prefix_cache_mb"):
        Engine(targets["gemma3"], prefix_cache_mb=-1)


def test_parallel_requests_share_a_prompt_prefilled_once(checkpoints, targets):
    """A request submitted beside another with the same prompt reuses its prefill at once."""
    engine = Engine(Engine.from_pretrained(checkpoints["shared_ple"], drafter="none").model, NgramDrafter())
    fed = count_fed_tokens(engine.model)
    ids = prompt(35, length=50)
    a = engine.submit(ids, max_new_tokens=20, stop_token_ids=[])
    b = engine.submit(ids[:45] + [7, 8], max_new_tokens=20, stop_token_ids=[])
    ra, rb = a.result(), b.result()
    assert ra.stats.cached_tokens == 0 and rb.stats.cached_tokens == 45
    # Two prefills: the whole prompt, then only the new tokens (in the first round, or the next one
    # after the first request's first verification block, depending on when the second arrived).
    assert fed[0] == 50 and 2 in fed[1:3], fed
    assert ra.token_ids == hf_greedy(targets["shared_ple"], ids, 20)
    assert rb.token_ids == hf_greedy(targets["shared_ple"], ids[:45] + [7, 8], 20)


def test_cancelled_request_still_leaves_what_it_computed(checkpoints, targets):
    engine = Engine(targets["noshare"], NoDrafter())
    ids = prompt(36, length=20)
    handle = engine.submit(ids, max_new_tokens=50, stop_token_ids=[])
    produced = []
    for burst in handle:
        produced += burst.token_ids
        if len(produced) >= 5:
            break
    handle.cancel()
    for _ in handle:  # the handle ends once the worker closed the request (and kept its cache)
        pass
    follow = engine.generate(ids + produced, max_new_tokens=5, stop_token_ids=[])
    assert follow.stats.cached_tokens >= len(ids) + 4  # at least what was verified before the cancel
    assert follow.token_ids == hf_greedy(targets["noshare"], ids + produced, 5)


def test_lru_budget_evicts_the_least_recently_used(targets):
    target = TargetModel(targets["gemma3"])
    cache = PrefixCache(budget_mb=1)

    def filled(tokens: list[int]):
        kv = target.new_cache()
        target.forward(tokens, kv, prefill=True)
        return kv

    with torch.inference_mode():
        entry_bytes = None
        for i in range(4):
            cache.insert("t", [i] * 30 + list(range(40)), filled([i] * 30 + list(range(40))))
            entry_bytes = entry_bytes or cache.nbytes
        assert len(cache) == 4
        cache.budget_bytes = int(entry_bytes * 2.5)  # room for two entries
        cache.lookup("t", [0] * 30)  # entry 0 becomes the most recent
        cache.insert("t", [9] * 70, filled([9] * 70))
        assert cache.nbytes <= cache.budget_bytes and len(cache) == 2
        assert cache.lookup("t", [0] * 30)[0] == 30
        assert cache.lookup("t", [2] * 30)[0] == 0
        # An entry a longer one extends is dropped; a prefix of a held entry is not stored again.
        longer = [9] * 70 + [5, 5]
        cache.insert("t", longer, filled(longer))
        assert len(cache) == 2 and cache.lookup("t", longer)[0] == len(longer)
        cache.insert("t", [9] * 10, filled([9] * 10))
        assert len(cache) == 2
        assert cache.lookup("other", longer) == (0, None)  # namespaces do not mix


def test_restored_cache_crops_anywhere(targets):
    """Sliding layers keep their history, so a stored cache restarts exactly at any length."""
    target = TargetModel(targets["gemma3"])
    ids = prompt(37, length=40)
    with torch.inference_mode():
        full = target.new_cache()
        target.forward(ids, full, prefill=True)
        stored = PrefixCache()
        stored.insert("t", ids, full)
        for n in (3, WINDOW, 25, 39):
            length, layers = stored.lookup("t", ids[:n] + [4])
            assert length == n
            restored = target.new_cache(layers, n)
            fresh = target.new_cache()
            a = target.logits(target.forward(ids[n:], restored, prefill=True).hidden[-1])
            b = target.logits(target.forward(ids, fresh, prefill=True).hidden[-1])
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
            assert restored.get_seq_length() == len(ids)


def test_a_forward_writes_its_rows_in_place_and_the_buffer_grows_by_chunks(targets):
    """A layer's K/V live in a buffer a forward only appends to: over 2 * GROW one-token steps the
    storage moves at most twice (concatenation would copy the whole cache at every step), and the
    cache still gives the logits of a fresh prefill."""
    target = TargetModel(targets["gemma3"])
    ids = prompt(38, length=10) + prompt(39, length=2 * GROW)
    with torch.inference_mode():
        kv = target.new_cache()
        target.forward(ids[:10], kv, prefill=True)
        moved = 0
        for token in ids[10:]:
            before = [layer.keys.untyped_storage().data_ptr() for layer in kv_layers(kv) if layer.keys is not None]
            out = target.forward([token], kv)
            after = [layer.keys.untyped_storage().data_ptr() for layer in kv_layers(kv) if layer.keys is not None]
            moved += before != after
        assert moved <= 2, moved
        fresh = target.new_cache()
        torch.testing.assert_close(
            target.logits(out.hidden[-1]), target.logits(target.forward(ids, fresh, prefill=True).hidden[-1]), atol=1e-4, rtol=1e-4
        )


def test_positions_a_snapshot_holds_are_never_written_again(targets):
    """A rollback below a stored length and new tokens there, and a request starting from the
    stored prefix, leave the stored entry as it was; the live caches hold their own tokens."""
    target = TargetModel(targets["gemma3"])
    ids, other = prompt(40, length=20), prompt(41, length=5)
    with torch.inference_mode():
        kv = target.new_cache()
        target.forward(ids, kv, prefill=True)
        stored = PrefixCache()
        stored.insert("t", ids, kv)
        _, layers = stored.lookup("t", ids)
        assert layers is not None
        before = [(k.clone(), v.clone()) for k, v in filter(None, layers)]
        kv.crop(-5)  # a rollback below the stored length, then other tokens at those positions
        target.forward(other, kv)
        restored = target.new_cache(layers, 10)
        target.forward(other, restored)
        for (k, v), (k0, v0) in zip(filter(None, layers), before):
            assert torch.equal(k, k0) and torch.equal(v, v0)
        for live, tokens in ((kv, ids[:15] + other), (restored, ids[:10] + other)):
            fresh = target.new_cache()
            target.forward(tokens, fresh, prefill=True)
            for a, b in zip(kv_layers(live), kv_layers(fresh)):
                if b.keys is not None:
                    torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 3, 4]) == 3
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_length([], [1]) == 0
    long = list(range(1000))
    assert common_prefix_length(long, long[:700] + [0] + long[701:]) == 700


def test_forget_makes_the_next_call_cold(checkpoints, targets):
    engine = Engine.from_pretrained(checkpoints["noshare"], drafter="hybrid")
    ids = prompt(38, length=30)
    cold = engine.generate(ids, max_new_tokens=20, num_draft_tokens=2, stop_token_ids=[])
    warm = engine.generate(ids, max_new_tokens=20, num_draft_tokens=2, stop_token_ids=[])
    # Warm: the prompt comes from the prefix cache, and the first draft already copies the cold
    # answer from the cross-call index (cold had nothing long to copy there); every draft is kept.
    assert warm.stats.cached_tokens == len(ids) - 1
    assert warm.stats.draft_lengths[0] == 2 > cold.stats.draft_lengths[0]
    assert warm.stats.accepted == warm.stats.drafted and warm.stats.target_forwards <= cold.stats.target_forwards
    engine.forget()
    again = engine.generate(ids, max_new_tokens=20, num_draft_tokens=2, stop_token_ids=[])
    assert again.stats.cached_tokens == 0 and again.stats.draft_lengths == cold.stats.draft_lengths
    assert again.token_ids == warm.token_ids == cold.token_ids == hf_greedy(targets["noshare"], ids, 20)
