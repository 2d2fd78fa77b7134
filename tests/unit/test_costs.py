"""Measured step costs: the online fit, the plans priced with it, and that timing never changes output."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_engine_greedy import NEW_TOKENS, hf_greedy, prompt
from test_engine_sampling import _chi2_ok, exact_marginals
from tiny_models import VOCAB

from langchain_gemma_mtp.draft_settings import DEFAULT_MTP_SIBLINGS, MAX_DRAFT_TOKENS, MAX_MTP_SIBLINGS
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.costs import MIN_DRAFTS, MIN_FORWARDS, CostModel, StepCosts
from langchain_gemma_mtp.engine.drafters import MTPDrafter
from langchain_gemma_mtp.engine.loop import speculative_decode
from langchain_gemma_mtp.engine.schedule import EXPLORE_EVERY, DraftScheduler, plan_for
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine.types import GenerationRequest, SamplingParams, SpeculativeStats
from langchain_gemma_mtp.engine.verify import process_logits
from langchain_gemma_mtp.engine.worker import run_alone
from langchain_gemma_mtp.errors import InvalidRequestError
from langchain_gemma_mtp.testing.replay import ReplayDrafter

CHEAP = StepCosts(0.002, 0.001, measured=True)  # rows and drafts almost free: long drafts, wide trees
DEAR = StepCosts(0.6, 0.6, measured=True)  # each row or draft token over half a forward: one draft


def feed(costs: CostModel, line: tuple[float, float], widths: list[int], draft_s: float, n: int = 40) -> None:
    """`n` rounds of forwards at each width, timed as base + slope * width, and of draft tokens."""
    base, slope = line
    for _ in range(n):
        for w in widths:
            costs.observe_forward(w, base + slope * w)
        costs.observe_draft(4, 4 * draft_s)


def test_prior_until_enough_steps_then_the_fitted_line():
    costs = CostModel(0.1)
    assert costs.relative() == StepCosts(0.05, 0.05) == costs.prior
    feed(costs, (0.1, 0.002), [1, 3, 9, 17], 0.004, n=1)
    assert costs.relative() == costs.prior  # 4 forwards, 4 draft tokens: too few
    feed(costs, (0.1, 0.002), [1, 3, 9, 17], 0.004, n=3 * MIN_FORWARDS)
    measured = costs.relative()
    assert measured.measured and costs.forwards >= MIN_FORWARDS and costs.draft_tokens >= MIN_DRAFTS
    # The ridge prior pulls a little towards 0.05; widths 1..17 pin the slope near the truth (0.0196).
    assert measured.row == pytest.approx(0.002 / 0.102, rel=0.1)
    assert measured.draft == pytest.approx(0.004 / 0.102, rel=0.01)
    snap = costs.snapshot()
    assert snap["forward_s"] == pytest.approx(0.102, rel=0.02) and snap["draft_token_s"] == pytest.approx(0.004)
    costs.learning = False
    assert costs.relative() == costs.prior


def test_one_width_only_keeps_the_prior_slope():
    costs = CostModel(0.1)
    feed(costs, (0.2, 0.0), [7], 0.001)  # every step verifies 7 rows: the slope cannot be told
    assert costs.relative().row == pytest.approx(0.05, rel=0.3)


def test_warm_up_outliers_and_noise_barely_move_the_fit():
    costs = CostModel(0.1)
    for w in [1, 2, 5, 9, 17]:
        costs.observe_forward(w, 20.0)  # the first call at each width: kernels chosen, caches cold
    costs.observe_draft(3, 3.0)
    g = torch.Generator().manual_seed(0)
    for i in range(400):
        w = [1, 2, 5, 9, 17][i % 5]
        t = (0.28 + 0.0025 * w) * (1 + 0.05 * float(torch.randn(1, generator=g)))
        costs.observe_forward(w, t * (50 if i % 37 == 0 else 1))  # now and then a descheduled step
        costs.observe_draft(3, 3 * 0.004 * (50 if i % 41 == 0 else 1))
    relative = costs.relative()
    assert relative.row == pytest.approx(0.0025 / 0.2825, abs=0.01)
    assert relative.draft == pytest.approx(0.004 / 0.2825, rel=0.5)


def test_a_warm_up_forward_is_dropped():
    costs = CostModel(0.1)
    for w in (1, 17):
        costs.observe_forward(w, 5.0)  # the first forward at a width: fifty times the rest
        for _ in range(10):
            costs.observe_forward(w, 0.1 + 0.001 * w)
    assert costs.snapshot()["forward_s"] == pytest.approx(0.101, rel=0.05)


def test_faster_width_is_read_as_flat():
    costs = CostModel(0.1)
    feed(costs, (0.3, -0.001), [1, 17], 0.001)
    assert costs.relative().row == 0.0


def test_a_step_in_the_forward_cost_is_priced_where_it_was_seen():
    # float32 on a 2-core CPU: an E2B-shaped body costs the same at 1-3 rows and nearly double at 4.
    costs = CostModel(0.1)
    for _ in range(20):
        for w in (1, 2, 3):
            costs.observe_forward(w, 0.10)
        for w in (4, 5, 6, 7):
            costs.observe_forward(w, 0.19)
        for w in (8, 12, 16):
            costs.observe_forward(w, 0.21)
        costs.observe_draft(4, 4 * 0.002)
    measured = costs.relative()
    line = dataclasses.replace(measured, excess=())
    assert measured.time(3, 2) < line.time(3, 2) and measured.time(4, 3) > line.time(4, 3)
    # At acceptance 0.6 two drafts stop short of the step; a line through the buckets drafts past it.
    alphas = [0.6] * MAX_DRAFT_TOKENS
    assert plan_for(alphas, measured).k == 2 < plan_for(alphas, line).k
    # A shared forward's width is every request's rows: there the line alone prices a plan.
    shared = dataclasses.replace(measured, share=0.5)
    assert shared.time(4, 3) == pytest.approx(dataclasses.replace(line, share=0.5).time(4, 3))
    # A bucket timed fewer than three times keeps the line.
    costs.observe_forward(40, 0.4)
    assert costs.relative().excess[(40).bit_length()] == 0.0


def test_a_drafter_calls_fixed_part_is_paid_once_per_step():
    """A drafter call costs a fixed part and a part per token (the distilled MTP drafter on the 270M:
    about 1.8 ms a call and 2.8 ms a token). The fit tells them apart once calls draft different
    counts, and the fixed part, paid once a step, buys longer drafts than the same seconds priced
    per token would."""
    costs = CostModel(0.1)
    for _ in range(40):
        for k in (1, 2, 4, 8):
            costs.observe_forward(k + 1, 0.05 + 0.0006 * (k + 1))
            costs.observe_draft(k, 0.0018 + 0.0028 * k)
    snap = costs.snapshot()
    # The pull towards the origin (calls that draft nothing) takes a little of the fixed part.
    assert snap["draft_call_s"] == pytest.approx(0.0018, rel=0.15) and snap["draft_token_s"] == pytest.approx(0.0028, rel=0.1)
    measured = costs.relative()
    assert measured.call == pytest.approx(snap["draft_call_s"] / snap["forward_s"]) and measured.time(4, 3) > measured.time(4, 0)
    per_token = dataclasses.replace(measured, draft=measured.draft + measured.call / 3, call=0.0)  # its seconds per token at 3 a call
    alphas = [0.7] * MAX_DRAFT_TOKENS
    assert plan_for(alphas, measured).k > plan_for(alphas, per_token).k
    assert plan_for(alphas, measured).stop_below < plan_for(alphas, per_token).stop_below  # the marginal token is cheaper
    # One call drafting for four requests shares its fixed part among them, as their forward does.
    batched = CostModel(0.1)
    for _ in range(40):
        for k in (1, 2, 4, 8):
            batched.observe_draft(4 * k, 0.0018 + 4 * 0.0028 * k, requests=4)
    assert batched.snapshot()["draft_call_s"] == pytest.approx(0.0018 / 4, rel=0.15)


def test_plans_follow_the_costs():
    alphas = [0.8] * MAX_DRAFT_TOKENS
    prior = plan_for(alphas, StepCosts.prior(0.1))
    assert (prior.k, prior.stop_below, prior.siblings) == (6, None, None)  # the constant-cost schedule
    cheap, dear = plan_for(alphas, CHEAP), plan_for(alphas, DEAR)
    assert cheap.k == MAX_DRAFT_TOKENS and dear.k == 1
    assert cheap.siblings == MAX_MTP_SIBLINGS and dear.siblings is not None and dear.siblings < MAX_MTP_SIBLINGS
    assert cheap.stop_below is not None and dear.stop_below is not None and cheap.stop_below < 0.05 < dear.stop_below
    # Per position: a kind whose drafts fail at the third position drafts two.
    assert plan_for([0.95, 0.95, 0.05, *[0.95] * 13], StepCosts(0.02, 0.02, measured=True)).k == 2


def test_a_shared_forward_prices_its_fixed_cost_per_request():
    costs = CostModel(0.1)
    feed(costs, (0.05, 0.001), [1, 5, 17, 40, 120], 0.0005)
    alone = costs.relative()
    assert alone.measured and alone.share == 1.0 and costs.snapshot()["sharing"] == 1
    costs.observe_forward(160, 0.2, requests=16)  # a verification forward over 16 requests' drafts
    costs.observe_forward(256, 0.3)  # a prompt chunk beside them: not a verification, the share stays
    shared = costs.relative()
    assert shared.share == pytest.approx(1 / 16) and costs.snapshot()["sharing"] == 16
    # The fixed cost is split, the rows are not.
    single = dataclasses.replace(shared, share=1.0, excess=())  # the line alone, as the shared forward prices it
    assert shared.time(1, 0) == pytest.approx((1 - shared.row) / 16 + shared.row)
    assert shared.time(17, 16) - shared.time(1, 0) == pytest.approx(single.time(17, 16) - single.time(1, 0))
    # So the same acceptance buys a shorter draft and a narrower tree in the batch.
    alphas = [0.8] * MAX_DRAFT_TOKENS
    alone_plan, shared_plan = plan_for(alphas, single), plan_for(alphas, shared)
    assert shared_plan.k < alone_plan.k
    assert shared_plan.stop_below is not None and alone_plan.stop_below is not None and shared_plan.stop_below > alone_plan.stop_below
    costs.observe_forward(9, 0.06, requests=1)  # alone again
    assert costs.relative().share == 1.0


def test_scheduler_learns_per_position():
    scheduler = DraftScheduler(0.1)
    policy = scheduler.policy(GenerationRequest([1], draft_hint="prose"), can_draft=True)
    for _ in range(60):
        policy.observe(8, 3)  # the first three always kept, the fourth always rejected
    assert policy.next_plan().k == 3


def test_measured_plans_explore_wider_and_narrower_now_and_then():
    scheduler = DraftScheduler(0.1)
    request = GenerationRequest([1], draft_hint="prose")
    policy = scheduler.policy(request, can_draft=True)
    for _ in range(60):
        policy.observe(8, 3)  # the first three always kept, the fourth always rejected
    assert {policy.next_plan().k for _ in range(3 * EXPLORE_EVERY)} == {3}  # prior costs: never
    feed(scheduler.costs, (0.1, 0.001), [1, 4, 9], 0.001)
    lengths = [scheduler.policy(request, can_draft=True).next_plan().k for _ in range(3 * EXPLORE_EVERY)]
    best = max(set(lengths), key=lengths.count)
    # Every 16th plan of the kind: twice as long, then half as long, in turn.
    wide, narrow = 2 * best, max(1, best // 2)
    assert [k for k in lengths if k != best] in ([wide, narrow, wide], [narrow, wide, narrow])
    at = [i for i, k in enumerate(lengths) if k != best]
    assert at[1] - at[0] == at[2] - at[1] == EXPLORE_EVERY
    # A seeded sampled call keeps the prior's plans, whatever the engine measured.
    seeded = GenerationRequest([1], draft_hint="prose", sampling=SamplingParams(temperature=0.8), seed=1)
    assert not seeded.learns
    fixed = scheduler.policy(seeded, can_draft=True)
    assert len({fixed.next_plan().k for _ in range(3 * EXPLORE_EVERY)}) == 1


@pytest.fixture(scope="module")
def mtp_engines(checkpoints):
    return {kind: Engine.from_pretrained(checkpoints[kind], drafter=d) for kind, d in (("shared_ple", "mtp"), ("gemma3", "hybrid"))}


def pin(engine: Engine, costs: StepCosts, monkeypatch) -> None:
    """Force the engine's fitted costs, whatever the loop measures while the test runs."""
    monkeypatch.setattr(engine.scheduler.costs, "relative", lambda: costs)


@pytest.mark.parametrize("kind", ["shared_ple", "gemma3"])
@pytest.mark.parametrize("costs", [CHEAP, DEAR], ids=["cheap", "dear"])
def test_greedy_identity_under_extreme_fitted_costs(mtp_engines, kind, costs, monkeypatch):
    engine = mtp_engines[kind]
    pin(engine, costs, monkeypatch)
    for s in (11, 12):
        ref = hf_greedy(engine.model, prompt(s), NEW_TOKENS)
        for hint in ("code", "long_form"):
            result = engine.generate(prompt(s), max_new_tokens=NEW_TOKENS, draft_hint=hint, stop_token_ids=[])
            assert result.token_ids == ref, f"{kind}/{hint}/prompt {s}"
            lengths, widths = result.stats.draft_lengths, result.stats.verify_widths
            if kind != "shared_ple":  # hybrid copies long n-gram matches whatever the plan says
                continue
            if costs is DEAR:
                assert max(lengths) <= 1
            else:
                # Wider trees than the default width allows (the untrained drafter's early stop keeps chains short).
                assert any(w > 1 + d * (1 + DEFAULT_MTP_SIBLINGS) for w, d in zip(widths, lengths))


def test_seeded_sampling_ignores_timing(small_target, monkeypatch):
    model, assistant = small_target
    # No early stop: the untrained drafter would stop every draft after one token whatever k is.
    engine = Engine(model, MTPDrafter(assistant, TargetModel(model), stop_below=0.0))
    kwargs = dict(max_new_tokens=30, temperature=1.0, stop_token_ids=[])
    learning = GenerationRequest([2, 5, 9])
    outputs = []
    for costs in (CHEAP, DEAR):  # rows and drafts almost free, then dearer than half a forward
        pin(engine, costs, monkeypatch)
        outputs.append(engine.generate([2, 5, 9], seed=123, **kwargs).token_ids)
        plans = sorted(engine.scheduler.policy(learning, can_draft=True).next_plan().k for _ in range(3))
        outputs.append(plans[1])  # at most one plan in sixteen explores: the middle of three does not
    assert outputs[1] > 10 and outputs[3] == 1  # a learning call would have drafted long, then 1 (the prior: 5)
    assert outputs[0] == outputs[2]
    # Draft lengths do change this seed's output, so the equality above is the fixed schedule's doing.
    fixed = [engine.generate([2, 5, 9], seed=123, num_draft_tokens=n, **kwargs).token_ids for n in (1, 16)]
    assert fixed[0] != fixed[1]


def test_sampling_keeps_the_distribution_under_measured_costs(small_target, monkeypatch):
    model, assistant = small_target
    engine = Engine(model, MTPDrafter(assistant, TargetModel(model)))
    pin(engine, CHEAP, monkeypatch)  # the longest drafts and the lowest early stop the schedule picks
    sampling = SamplingParams(1.0, 1.0, 0)
    ids, n_tokens, draws = [2, 5, 9, 5, 9, 3, 7], 3, 1000
    exact = exact_marginals(model, ids, n_tokens, lambda _, logits: process_logits(logits, sampling))
    request = engine.make_request(ids, max_new_tokens=n_tokens + 1, temperature=1.0, stop_token_ids=[])
    assert request.learns  # unseeded: the measured-cost policy; its generator is seeded here instead
    samples, drafted = [[] for _ in range(n_tokens)], 0
    with torch.inference_mode():
        for seed in range(draws):
            stats = SpeculativeStats()
            policy = engine.scheduler.policy(request, can_draft=True)
            bursts = speculative_decode(engine.target, engine.drafter, request, policy, stats, torch.Generator().manual_seed(seed))
            out = [t for b in run_alone(bursts) for t in b.token_ids]
            drafted += stats.drafted
            for i in range(n_tokens):
                samples[i].append(out[i])
    assert drafted >= draws
    for i in range(n_tokens):
        assert _chi2_ok(samples[i], exact[i].float()) > 1e-3, f"token {i + 1} off the target's distribution"


def test_replay_drafter_accepts_what_it_keeps(checkpoints):
    engine = Engine.from_pretrained(checkpoints["noshare"], drafter="none")
    ref = engine.generate(prompt(11), max_new_tokens=NEW_TOKENS, stop_token_ids=[]).token_ids
    drafter = ReplayDrafter(ref, 0.7, VOCAB, seed=3, step_size=64)
    result = Engine(engine.model, drafter).generate(prompt(11), max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=[])
    assert result.token_ids == ref
    # Walk the kept positions as the loop does: each step keeps the leading kept drafts, then the target's own token.
    done, accepted = 1, 0
    while done < NEW_TOKENS:
        k = min(4, NEW_TOKENS - done - 1)
        run = next((i for i in range(k) if not drafter.kept[done + i]), k)
        accepted, done = accepted + run, done + run + 1
    assert result.stats.accepted == accepted and 0 < accepted < result.stats.drafted
    assert 0.5 < sum(drafter.kept) / len(ref) < 0.9


def test_replay_drafter_refuses_a_bad_acceptance():
    with pytest.raises(InvalidRequestError, match=r"accept must be a probability in \[0, 1\]"):
        ReplayDrafter([5, 6], 1.5, VOCAB)


def test_costs_show_in_stats_and_repr(checkpoints):
    engine = Engine.from_pretrained(checkpoints["noshare"], drafter="mtp")
    assert "costs=prior" in repr(engine)
    result = engine.generate(prompt(11), max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert result.stats.costs["forwards"] == result.stats.steps and result.stats.costs["forward_s"] > 0
    assert len(result.stats.verify_widths) == result.stats.steps
    assert "costs=measured" in repr(engine) and "draft_call=" in repr(engine)
