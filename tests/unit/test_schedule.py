"""Per-call draft lengths: fixed lengths, per-hint adaptive statistics, no global mutable config."""

from __future__ import annotations

import pytest
from test_engine_greedy import oracle, prompt

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.schedule import HINT_PRIOR_ALPHA, DraftScheduler, best_draft_length
from langchain_gemma_mtp.engine.types import GenerationRequest


def test_default_lengths_per_hint_for_mtp_cost():
    lengths = {h: best_draft_length(a, 0.1) for h, a in HINT_PRIOR_ALPHA.items()}
    assert lengths == {"code": 4, "prose": 6, "tool_call": 7, "long_form": 10, "auto": 5}


def test_length_is_bounded_and_monotone_in_acceptance():
    ks = [best_draft_length(a / 100, 0.1) for a in range(0, 101, 5)]
    assert ks == sorted(ks)
    assert min(ks) == 1 and max(ks) == 16


def test_hint_kinds_learn_separately():
    scheduler = DraftScheduler(0.1)
    before = scheduler.snapshot()
    code = scheduler.policy(GenerationRequest([1], draft_hint="code"), can_draft=True)
    for _ in range(50):
        code.observe(4, 0)  # code drafts keep failing
    after = scheduler.snapshot()
    assert after["code"]["draft_length"] == 1 < before["code"]["draft_length"]
    assert after["prose"] == before["prose"]
    prose = scheduler.policy(GenerationRequest([1], draft_hint="prose"), can_draft=True)
    for _ in range(50):
        prose.observe(6, 6)
    assert scheduler.snapshot()["prose"]["draft_length"] == 16
    assert scheduler.snapshot()["code"]["draft_length"] == 1


@pytest.fixture(scope="module")
def oracle_engine(checkpoints):
    base = Engine.from_pretrained(checkpoints["noshare"], drafter="none")
    ref = base.generate(prompt(11), max_new_tokens=60, stop_token_ids=[]).token_ids
    engine = Engine(base.model, oracle(ref))
    engine.scheduler.costs.learning = False  # priced with the prior: the lengths start at the table's
    return engine, ref


def test_num_draft_tokens_fixes_this_call_only(oracle_engine):
    engine, ref = oracle_engine
    fixed = engine.generate(prompt(11), max_new_tokens=60, num_draft_tokens=3, stop_token_ids=[])
    assert set(fixed.stats.draft_lengths[:-1]) == {3}
    as_int_hint = engine.generate(prompt(11), max_new_tokens=60, draft_hint=2, stop_token_ids=[])
    assert set(as_int_hint.stats.draft_lengths[:-1]) == {2}
    adaptive = engine.generate(prompt(11), max_new_tokens=60, draft_hint="code", stop_token_ids=[])
    # The oracle is always right, so the code policy grows its drafts within the call.
    assert adaptive.stats.draft_lengths[0] == 4 and max(adaptive.stats.draft_lengths) > 4
    assert adaptive.token_ids == fixed.token_ids == ref


def test_no_generation_config_is_touched(oracle_engine):
    engine, _ = oracle_engine
    before = engine.model.generation_config.to_dict()
    config_before = engine.model.config.to_dict()
    for hint in ("code", "prose", "tool_call", "long_form", "auto", 5):
        engine.generate(prompt(12), max_new_tokens=10, draft_hint=hint, stop_token_ids=[])
    assert engine.model.generation_config.to_dict() == before
    assert engine.model.config.to_dict() == config_before
