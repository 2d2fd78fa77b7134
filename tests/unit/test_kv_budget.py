"""The KV-cache budget of running requests: the estimate is what caches really hold, a request that
could never fit is refused before any forward (in-process as over HTTP), and requests that do not
fit together wait their turn and still give their exact outputs."""

from __future__ import annotations

import time

import pytest
import torch
from chat_fixtures import TOKENIZER_DIR
from chat_fixtures import build_target as build_chat_target
from test_engine_greedy import prompt
from tiny_models import build_target
from transformers import AutoTokenizer

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import DraftModelDrafter, NoDrafter
from langchain_gemma_mtp.engine.memory import HEADROOM, MB, kv_bytes_per_position
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.errors import InvalidRequestError, KVCacheLimitError

PROMPT = prompt(0)
LONG = 120  # max_new_tokens of the request that keeps the budget busy


def _cache_bytes(cache) -> int:
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        if layer.is_initialized and layer.keys is not None
        for t in (layer.keys, layer.values)
    )


@pytest.mark.parametrize("kind", ["shared_ple", "noshare", "conditional", "gemma3"])
def test_the_estimate_per_position_is_what_a_cache_holds_after_a_forward(kind) -> None:
    target = TargetModel(build_target(kind))
    cache = target.new_cache()
    with torch.inference_mode():
        target.forward(PROMPT, cache, prefill=True)
        target.forward(PROMPT[:7], cache)  # a verification block on top, as the loop feeds it
    assert _cache_bytes(cache) == (len(PROMPT) + 7) * kv_bytes_per_position(target) > 0


def test_a_draft_models_own_cache_is_counted_too() -> None:
    target, draft = build_target("shared_ple"), TargetModel(build_target("noshare", seed=7))
    plain = Engine(target, NoDrafter())
    drafted = Engine(target, DraftModelDrafter(draft))
    assert drafted.kv_bytes_per_position == plain.kv_bytes_per_position + kv_bytes_per_position(draft)


def _engine(positions: int, **kwargs) -> Engine:
    """An engine whose running requests may hold `positions` positions of KV cache together."""
    engine = Engine(build_target("noshare", seed=1), NoDrafter(), **kwargs)
    engine.limit_kv_cache(positions * engine.kv_bytes_per_position / MB)
    return engine


def test_a_request_that_can_never_fit_is_refused_before_any_forward_and_the_fix_it_names_works() -> None:
    engine = _engine(len(PROMPT) + 40 + HEADROOM)
    forwards = []
    engine.target.decoder.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(KVCacheLimitError, match=r"over the engine's limit of .* MB.*ask for at most 40 max_tokens.*kv_cache_mb") as caught:
        engine.generate(PROMPT, max_new_tokens=41)
    assert isinstance(caught.value, InvalidRequestError) and not forwards
    assert len(engine.generate(PROMPT, max_new_tokens=40, stop_token_ids=[]).token_ids) == 40
    assert engine.kv_budget.held == 0


def test_the_limit_must_be_a_positive_number() -> None:
    for bad in (0, -1, "10", True):
        with pytest.raises(InvalidRequestError, match="kv_cache_mb must be a number > 0"):
            Engine(build_target("noshare"), NoDrafter(), kv_cache_mb=bad)


def test_requests_that_do_not_fit_together_run_one_after_the_other_with_their_exact_outputs() -> None:
    free = _engine(10_000)
    expected = [free.generate(prompt(s), max_new_tokens=LONG, stop_token_ids=[]).token_ids for s in (1, 2)]
    engine = _engine(len(PROMPT) + LONG + HEADROOM)  # room for one of them
    first = engine.submit(prompt(1), max_new_tokens=LONG, stop_token_ids=[])
    second = engine.submit(prompt(2), max_new_tokens=LONG, stop_token_ids=[])
    seen_waiting = False
    while first.finish_reason is None:
        next(first)
        if not second._job.outbox:  # nothing of the second yet, while the first holds the budget
            seen_waiting |= engine.worker.waiting == 1 and engine.kv_budget.held == engine.kv_budget.limit_bytes
        else:
            pytest.fail("the second request started beside the first, past the KV budget")
    assert seen_waiting
    assert first.result().token_ids == expected[0] and second.result().token_ids == expected[1]
    assert engine.kv_budget.held == 0 and engine.worker.waiting == 0


def test_a_cancelled_waiting_request_never_runs_and_gives_nothing_back_twice() -> None:
    engine = _engine(len(PROMPT) + LONG + HEADROOM)
    first = engine.submit(prompt(1), max_new_tokens=LONG, stop_token_ids=[])
    second = engine.submit(prompt(2), max_new_tokens=LONG, stop_token_ids=[])
    second.cancel()
    assert second.result().token_ids == []
    assert len(first.result().token_ids) == LONG
    deadline = time.monotonic() + 10
    while engine.worker.waiting and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.kv_budget.held == 0 and engine.worker.waiting == 0


def test_chat_gemma_mtp_in_process_gets_the_same_clear_error() -> None:
    engine = Engine(build_chat_target(seed=1), NoDrafter(), AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    engine.limit_kv_cache((HEADROOM + 60) * engine.kv_bytes_per_position / MB)  # a short answer fits, 500 tokens do not
    llm = ChatGemmaMTP(engine=engine, max_tokens=500)
    with pytest.raises(KVCacheLimitError, match="max_tokens"):
        llm.invoke("Hello")
    assert llm.bind(max_tokens=5).invoke("Hello").response_metadata["finish_reason"] in ("length", "stop")
