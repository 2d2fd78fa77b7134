"""Kernel forms of `x @ W.T`: every form computes the product, the chooser keeps the form its own
timed calls found fastest, and the engine's greedy output stays transformers' whichever form runs."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from test_engine_greedy import NEW_TOKENS, PROMPT_SEEDS, hf_greedy, prompt

from langchain_gemma_mtp.engine import Engine, matmul
from langchain_gemma_mtp.engine.matmul import FORMS, FormChooser, measure_linears, measured_forms
from langchain_gemma_mtp.errors import InvalidRequestError


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24), (2, 24), (5, 24), (1, 7, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_form_computes_the_linear_product(form, shape, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(*shape, generator=g).to(dtype), torch.randn(40, 24, generator=g).to(dtype)
    out = FORMS[form](x, weight)
    assert out.shape == (*shape[:-1], 40) and out.is_contiguous()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, F.linear(x, weight), rtol=tolerance, atol=tolerance)


class FakeClock:
    """Time that moves only when a form runs, by that form's made-up cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def timed_forms(monkeypatch, clock: FakeClock, costs: dict[str, float], ran: list[str]) -> None:
    for name, real in dict(FORMS).items():

        def form(x, weight, name=name, real=real):
            ran.append(name)
            clock.now += costs[name](x) if callable(costs[name]) else costs[name]
            return real(x, weight)

        monkeypatch.setitem(FORMS, name, form)


def test_the_chooser_keeps_the_form_its_own_calls_timed_fastest(monkeypatch) -> None:
    clock, ran = FakeClock(), []
    # One row: `paired` is cheapest; more rows: `transposed` (two rows: `linear`, in another bucket).
    costs = {
        "linear": lambda x: 2.0 if x.shape[0] != 2 else 0.5,
        "transposed": lambda x: 1.0,
        "paired": lambda x: 0.1,
        "onednn": lambda x: 1.5,
    }
    timed_forms(monkeypatch, clock, costs, ran)
    chooser = FormChooser(clock=clock)
    weight = torch.randn(8, 4)
    one, two, five = torch.randn(1, 4), torch.randn(2, 4), torch.randn(5, 4)
    for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
        chooser(one, weight)
    # Every form in turn, each timed TRIALS times after a warm-up call; nothing ran twice.
    assert sorted(ran) == sorted(list(FORMS) * (matmul.TRIALS + 1))
    assert chooser.chosen[((8, 4), torch.float32, 0)] == "paired"
    ran.clear()
    chooser(one, weight)
    assert ran == ["paired"]
    ran.clear()
    for rows in (two, five):
        for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
            chooser(rows, weight)
    assert chooser.chosen[((8, 4), torch.float32, 1)] == "linear"
    assert chooser.chosen[((8, 4), torch.float32, 3)] == "transposed"
    assert "paired" not in ran  # tried for one row only


def test_cheap_products_are_timed_until_enough_time_is_counted(monkeypatch) -> None:
    """A body layer's product takes 0.1-0.5 ms: three timed calls would let timer noise choose, so
    each form runs until TRIAL_SECONDS of counted calls (a 60 ms head is decided after TRIALS)."""
    clock, ran = FakeClock(), []
    per_call = matmul.TRIAL_SECONDS / 10
    timed_forms(monkeypatch, clock, {"linear": per_call, "transposed": per_call / 2, "paired": per_call, "onednn": per_call}, ran)
    chooser = FormChooser(clock=clock)
    weight, x = torch.randn(8, 4), torch.randn(3, 4)
    key = ((8, 4), torch.float32, 2)
    for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
        chooser(x, weight)
    assert key not in chooser.chosen
    while key not in chooser.chosen:
        chooser(x, weight)
    assert chooser.chosen[key] == "transposed"
    # Every form tried got at least TRIAL_SECONDS of counted (non-warm-up) calls.
    assert min(ran.count(form) - 1 for form in set(ran)) * per_call >= matmul.TRIAL_SECONDS * 0.99


def test_a_product_too_small_to_matter_is_decided_after_trial_calls(monkeypatch) -> None:
    clock, ran = FakeClock(), []
    timed_forms(monkeypatch, clock, {name: 1e-9 for name in FORMS}, ran)
    chooser = FormChooser(clock=clock)
    key = ((8, 4), torch.float32, 2)
    while key not in chooser.chosen:
        chooser(torch.randn(3, 4), torch.randn(8, 4))
    assert {ran.count(form) for form in set(ran)} == {matmul.TRIAL_CALLS + 1}


def test_a_torch_build_without_a_working_onednn_op_never_tries_it(monkeypatch) -> None:
    """The op is private to torch.compile: a build that lacks it, or computes something else, is found
    by one probe on import, and the chooser then never runs it (the call would fail a request)."""

    def missing(x, weight):
        raise AttributeError("no mkldnn::_linear_pointwise in this build")

    monkeypatch.setattr(matmul, "_onednn_product", missing)
    assert not matmul._probe_onednn()
    monkeypatch.setattr(matmul, "_onednn_product", lambda x, weight: F.linear(x, weight) + 1)
    assert not matmul._probe_onednn()
    monkeypatch.setattr(matmul, "ONEDNN", False)
    clock, ran = FakeClock(), []
    timed_forms(monkeypatch, clock, {name: 1.0 for name in FORMS}, ran)
    chooser = FormChooser(clock=clock)
    for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
        chooser(torch.randn(1, 4), torch.randn(8, 4))
    assert "onednn" not in ran and ((8, 4), torch.float32, 0) in chooser.chosen


@pytest.mark.skipif(not matmul.ONEDNN, reason="this torch build has no oneDNN")
def test_onednn_is_tried_for_float32_only(monkeypatch) -> None:
    """oneDNN's bf16 inner product needs avx512 or avx_ne_convert: in bf16 the form would only run
    `linear` again, so it costs no trial there; in float32 it is measured, and wins where fastest."""
    clock, ran = FakeClock(), []
    timed_forms(monkeypatch, clock, {"linear": 2.0, "transposed": 3.0, "paired": 3.0, "onednn": 1.0}, ran)
    chooser = FormChooser(clock=clock)
    for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
        chooser(torch.randn(4, 4, dtype=torch.bfloat16), torch.randn(8, 4, dtype=torch.bfloat16))
    assert "onednn" not in ran and chooser.chosen[((8, 4), torch.bfloat16, 2)] == "linear"
    for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
        chooser(torch.randn(4, 4), torch.randn(8, 4))
    assert chooser.chosen[((8, 4), torch.float32, 2)] == "onednn"


def test_a_warm_up_call_does_not_decide(monkeypatch) -> None:
    """Each form's first call (first touch of its buffers, kernel set-up) is not counted."""
    clock, ran = FakeClock(), []
    # `linear`'s first call looks fastest of all; the calls that count are slower than `transposed`.
    costs = {"linear": lambda x: 0.1 if ran.count("linear") == 1 else 5.0, "transposed": 1.0, "paired": 1.0, "onednn": 2.0}
    timed_forms(monkeypatch, clock, costs, ran)
    chooser = FormChooser(clock=clock)
    for _ in range(len(FORMS) * (matmul.TRIALS + 1)):
        chooser(torch.randn(3, 4), torch.randn(8, 4))
    assert chooser.chosen[((8, 4), torch.float32, 2)] == "transposed"


def test_a_fixed_form_is_not_measured_and_a_bad_one_is_refused(monkeypatch) -> None:
    ran: list[str] = []
    timed_forms(monkeypatch, FakeClock(), {name: 1.0 for name in FORMS}, ran)
    chooser = FormChooser("transposed")
    for rows in (1, 2, 5):
        chooser(torch.randn(rows, 4), torch.randn(8, 4))
    assert ran == ["transposed"] * 3 and chooser.chosen == {}
    with pytest.raises(InvalidRequestError, match="GEMMA_MTP_MATMUL"):
        FormChooser("fast")


def test_only_the_owner_threads_calls_change_form(monkeypatch) -> None:
    """The user's own calls on a model the engine measures (transformers' generate on their thread)
    run `linear`, exactly as before; inside `measured_forms` they go through the chooser."""
    calls: list[str] = []
    monkeypatch.setattr(matmul, "CHOOSER", lambda x, weight: calls.append("chosen") or F.linear(x, weight))
    layer = torch.nn.Linear(4, 8, bias=False)
    measure_linears(layer)
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), F.linear(x, layer.weight)) and calls == []
    seen = []
    thread = threading.Thread(target=lambda: seen.append(layer(x)))
    with measured_forms():
        layer(x)
        thread.start()
        thread.join()
    assert calls == ["chosen"] and torch.equal(seen[0], F.linear(x, layer.weight))


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])
def test_greedy_output_is_transformers_whichever_form_runs(checkpoints, monkeypatch, kind, form) -> None:
    """float32: the engine's speculative greedy output equals transformers' own greedy output (its
    `linear`) with every form fixed, the head and every linear layer of target and drafter."""
    monkeypatch.setattr(matmul.CHOOSER, "fixed", form)
    engine = Engine.from_pretrained(checkpoints[kind])
    for seed in PROMPT_SEEDS:
        expected = hf_greedy(engine.model, prompt(seed), NEW_TOKENS)
        for k in (1, 4):
            got = engine.generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=[])
            assert got.token_ids == expected, f"{kind}/{form}/k={k}/prompt {seed}"
