"""Greedy speculative output equals the target's own greedy output, token for token (fp32)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, build_target

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import DraftModelDrafter, NgramDrafter, NoDrafter
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.testing.replay import ReplayDrafter

PROMPT_SEEDS = (11, 12)
NEW_TOKENS = 40  # with 30-token prompts: well past the sliding window of 8


def prompt(seed: int, length: int = 30) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(3, VOCAB, (length - 1,), generator=g).tolist()


def hf_greedy(model, ids: list[int], max_new_tokens: int, eos: int | list[int] | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def engines(checkpoints):
    """One engine per (target kind, drafter), loaded through Engine.from_pretrained."""
    built = {}
    for kind, path in checkpoints.items():
        hybrid = Engine.from_pretrained(path)  # auto: finds <kind>-assistant beside it
        assert hybrid.drafter.name == "hybrid"
        mtp = Engine.from_pretrained(path, drafter="mtp")
        plain = Engine.from_pretrained(path, drafter="mtp", assistant=path.parent / f"{kind}-plain-assistant")
        built[kind, "hybrid"] = hybrid
        built[kind, "mtp-ordered"] = mtp
        built[kind, "mtp-plain"] = plain
        built[kind, "ngram"] = Engine(mtp.model, NgramDrafter())
        built[kind, "none"] = Engine(mtp.model, NoDrafter())
    # A draft model: a different random Gemma 4 of the same vocabulary.
    draft = TargetModel(build_target("noshare", seed=7))
    for kind in checkpoints:
        built[kind, "draft_model"] = Engine(built[kind, "none"].model, DraftModelDrafter(draft))
    return built


@pytest.fixture(scope="module")
def references(engines, checkpoints):
    return {(kind, s): hf_greedy(engines[kind, "none"].model, prompt(s), NEW_TOKENS) for kind in checkpoints for s in PROMPT_SEEDS}


@pytest.mark.parametrize("kind", ["shared_ple", "noshare", "conditional", "gemma3"])
@pytest.mark.parametrize("drafter", ["mtp-ordered", "mtp-plain", "hybrid", "ngram", "draft_model", "none"])
@pytest.mark.parametrize("k", [1, 3, 16])
def test_greedy_identity_every_drafter(engines, references, kind, drafter, k):
    engine = engines[kind, drafter]
    for s in PROMPT_SEEDS:
        result = engine.generate(prompt(s), max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[])
        assert result.token_ids == references[kind, s], f"{kind}/{drafter}/k={k}/prompt {s}"
        assert result.finish_reason == "length"
        assert result.stats.target_forwards == 1 + result.stats.steps


def oracle(continuation: list[int]) -> ReplayDrafter:
    """Drafts the true continuation (priced like the MTP drafter, for the adaptive schedule)."""
    return ReplayDrafter(continuation, 1.0, VOCAB, name="oracle")


def always_wrong(continuation: list[int]) -> ReplayDrafter:
    return ReplayDrafter(continuation, 0.0, VOCAB, name="wrong")


@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])
@pytest.mark.parametrize("k", [1, 2, 5, 16])
def test_oracle_and_always_wrong_drafters(engines, references, kind, k):
    ids, ref = prompt(11), references[kind, 11]
    model = engines[kind, "none"].model
    right = Engine(model, oracle(ref)).generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[])
    assert right.token_ids == ref
    assert right.stats.acceptance_rate == 1.0
    # The first token comes from prefill; each later step commits k drafts + 1 of the target's own.
    assert right.stats.steps == -(-(NEW_TOKENS - 1) // (k + 1))
    wrong = Engine(model, always_wrong(ref)).generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[])
    assert wrong.token_ids == ref
    assert wrong.stats.accepted == 0 and wrong.stats.steps == NEW_TOKENS - 1


@pytest.mark.parametrize("kind", ["shared_ple", "conditional", "gemma3"])
def test_stop_token_inside_an_accepted_block(engines, references, kind):
    ids, ref = prompt(12), references[kind, 12]
    stop = ref[17]
    first = ref.index(stop)
    expected = hf_greedy(engines[kind, "none"].model, ids, NEW_TOKENS, eos=stop)
    assert expected == ref[: first + 1]
    for k in (4, 16):  # the stop token lands inside a block of accepted drafts
        result = Engine(engines[kind, "none"].model, oracle(ref)).generate(
            ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[stop]
        )
        assert result.token_ids == expected
        assert result.finish_reason == "stop"


def test_default_stop_tokens_come_from_generation_config(engines, references):
    engine = engines["shared_ple", "mtp-ordered"]
    assert engine.stop_token_ids == frozenset({1})
    ids = prompt(11)
    expected = hf_greedy(engine.model, ids, NEW_TOKENS, eos=1)
    assert engine.generate(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=4).token_ids == expected


@pytest.mark.parametrize("max_new", [1, 2, 7, 13])
def test_max_new_tokens_ending_mid_block(engines, references, max_new):
    ids, ref = prompt(11), references["noshare", 11]
    result = Engine(engines["noshare", "none"].model, oracle(ref)).generate(
        ids, max_new_tokens=max_new, num_draft_tokens=8, stop_token_ids=[]
    )
    assert result.token_ids == ref[:max_new]
    assert result.finish_reason == "length"


def test_stream_bursts_concatenate_to_generate(engines, references):
    engine = engines["shared_ple", "ngram"]
    ids = prompt(12)
    stream = engine.stream(ids, max_new_tokens=NEW_TOKENS, num_draft_tokens=6, stop_token_ids=[])
    bursts = list(stream)
    assert [t for b in bursts for t in b.token_ids] == references["shared_ple", 12]
    assert stream.token_ids == references["shared_ple", 12]
    assert all(len(b.token_ids) == b.accepted + 1 for b in bursts)
    assert bursts[-1].finish_reason == "length" and all(b.finish_reason is None for b in bursts[:-1])
    assert stream.stats.accepted == sum(b.accepted for b in bursts)


def test_long_sequences_past_the_window_with_repeated_calls(engines):
    """Many steps past the sliding window and several calls on one engine stay exact."""
    engine = engines["gemma3", "mtp-ordered"]
    for s in (21, 22, 23):
        ids = prompt(s, length=50)
        assert engine.generate(ids, max_new_tokens=90, num_draft_tokens=5, stop_token_ids=[]).token_ids == hf_greedy(engine.model, ids, 90)


@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])
def test_greedy_identity_random_prompts_and_lengths(engines, kind):
    """Many random prompts, prompt lengths, draft lengths and budgets against plain greedy."""
    g = torch.Generator().manual_seed(len(kind))
    engine = engines[kind, "mtp-ordered"]
    for trial in range(8):
        length = int(torch.randint(1, 60, (1,), generator=g))
        k = int(torch.randint(1, 17, (1,), generator=g))
        budget = int(torch.randint(1, 50, (1,), generator=g))
        ids = [2] + torch.randint(3, VOCAB, (length,), generator=g).tolist()
        got = engine.generate(ids, max_new_tokens=budget, num_draft_tokens=k, stop_token_ids=[]).token_ids
        assert got == hf_greedy(engine.model, ids, budget), f"trial {trial}: len {length}, k {k}, budget {budget}"
