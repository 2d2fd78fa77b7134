"""Bad requests fail with a clear InvalidRequestError before any forward pass."""

from __future__ import annotations

import pytest
from tiny_models import MAX_POS, VOCAB

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.errors import InvalidRequestError


@pytest.fixture(scope="module")
def counted(checkpoints):
    engine = Engine.from_pretrained(checkpoints["shared_ple"])
    calls = []
    engine.model.register_forward_pre_hook(lambda *a: calls.append(1))
    engine.target.decoder.register_forward_pre_hook(lambda *a: calls.append(1))
    return engine, calls


def test_max_positions_is_the_targets_context(counted):
    engine, _ = counted
    assert engine.max_positions == engine.model.config.max_position_embeddings == MAX_POS


@pytest.mark.parametrize(
    "prompt,kwargs,message",
    [
        ([], {}, "prompt_ids is empty"),
        ([2, VOCAB + 5], {}, "outside the vocabulary"),
        ([2, -1], {}, "outside the vocabulary"),
        ([2] * (MAX_POS - 10), {"max_new_tokens": 20}, f"exceeds the model's context of {MAX_POS}"),
        ([2, 3], {"max_new_tokens": 0}, "max_new_tokens must be a positive int"),
        ([2, 3], {"max_new_tokens": -4}, "max_new_tokens must be a positive int"),
        ([2, 3], {"num_draft_tokens": 17}, "num_draft_tokens must be an int in"),
        ([2, 3], {"num_draft_tokens": -1}, "num_draft_tokens must be an int in"),
        ([2, 3], {"draft_hint": "poetry"}, "unknown draft_hint 'poetry'"),
        ([2, 3], {"draft_hint": 40}, "an int draft_hint must be in"),
        ([2, 3], {"temperature": -1.0}, "temperature must be >= 0"),
        ([2, 3], {"top_p": 0.0}, "top_p must be in"),
        ([2, 3], {"top_k": -2}, "top_k must be"),
        ([2, 3], {"temperature": float("nan")}, "temperature must be >= 0"),
        ([2, 3], {"seed": 2**70, "temperature": 0.7}, r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
        ([2, 3], {"seed": -(2**63) - 1, "temperature": 0.7}, "seed must be an int in"),
    ],
)
def test_bad_requests_raise_before_any_forward(counted, prompt, kwargs, message):
    engine, calls = counted
    before = len(calls)
    with pytest.raises(InvalidRequestError, match=message):
        engine.stream(prompt, **kwargs)  # raises eagerly, not at the first next()
    with pytest.raises(ValueError, match=message):  # also a ValueError, for callers that catch that
        engine.generate(prompt, **kwargs)
    assert len(calls) == before


def test_good_request_after_bad_ones(counted):
    engine, calls = counted
    assert len(engine.generate([2, 3, 4], max_new_tokens=5, stop_token_ids=[]).token_ids) == 5
    assert calls


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 1e-300}, {"temperature": 5e-6}, {"temperature": 0.5, "top_p": 1e-300}, {"temperature": 0.5, "top_p": 1e-50}]
)
def test_extreme_sampling_values_that_underflow_float32_give_the_greedy_answer(counted, kwargs):
    """A temperature below 1e-5 is greedy (dividing by it overflows); a top_p that underflows to 0
    still keeps the top token. Both once crashed the step with NaN probabilities."""
    engine, _ = counted
    greedy = engine.generate([2, 5, 6, 7], max_new_tokens=8, stop_token_ids=[]).token_ids
    assert engine.generate([2, 5, 6, 7], max_new_tokens=8, stop_token_ids=[], seed=1, **kwargs).token_ids == greedy
