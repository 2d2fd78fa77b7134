"""Batched speculative decoding: requests in flight together share their forwards and stay exact (fp32)."""

from __future__ import annotations

import itertools
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_engine_greedy import hf_greedy, prompt
from test_engine_sampling import P_MIN, _chi2_ok, exact_marginals
from tiny_models import VOCAB, build_target
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from langchain_gemma_mtp.engine import Engine, batch, head, loop, packed, worker
from langchain_gemma_mtp.engine.batch import Feed, run_batch, run_feed, run_feeds
from langchain_gemma_mtp.engine.cache import kv_layers
from langchain_gemma_mtp.engine.costs import MIN_DRAFTS, MIN_FORWARDS
from langchain_gemma_mtp.engine.drafters import (
    Draft,
    DraftModelDrafter,
    HybridDrafter,
    MTPDrafter,
    NgramDrafter,
    NoDrafter,
    StatelessDrafter,
)
from langchain_gemma_mtp.engine.drafters.base import DraftRequest, DraftStep
from langchain_gemma_mtp.engine.packed import PACKING_KWARG
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine.tree import DraftTree
from langchain_gemma_mtp.engine.types import SamplingParams
from langchain_gemma_mtp.engine.verify import process_logits

KINDS = ["shared_ple", "noshare", "conditional", "gemma3"]


def fed_shapes(model) -> list[tuple[int, int]]:
    """(requests, tokens) of every forward of the model's decoder, recorded by a hook (a packed
    forward feeds its requests as one sequence)."""
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs, out) -> None:
        ids = kwargs.get("input_ids")
        fed = ids if ids is not None else kwargs["inputs_embeds"]  # transformers' generate may feed embeddings
        packed = kwargs.get(PACKING_KWARG)
        shapes.append((packed.requests if packed is not None else fed.shape[0], fed.shape[0] * fed.shape[1]))

    model.get_decoder().register_forward_hook(record, with_kwargs=True)
    return shapes


def _feeds(target: TargetModel) -> list[Feed]:
    """Verification blocks after caches of different lengths (past the sliding window): chains of
    several widths and a draft tree."""
    feeds = []
    for length, block in [(5, [1, 2, 3]), (40, [4]), (17, None), (3, [5, 6, 7, 8, 9])]:
        cache = target.new_cache()
        target.forward(prompt(length, length), cache, prefill=True)
        if block is None:
            tree = DraftTree([11, 12], [[13, 14], [15]])
            feeds.append(Feed(target, tree.tokens(10), cache, tree))
        else:
            feeds.append(Feed(target, block, cache))
    return feeds


def _chunks(target: TargetModel, specs: list[tuple[int, list[int], bool]]) -> list[Feed]:
    """Prompt chunks, each (cached, chunk, last): `chunk` fed after `cached` prompt tokens already in its cache."""
    feeds = []
    for cached, chunk, last in specs:
        cache = target.new_cache()
        if cached:
            target.forward(prompt(4, cached), cache, prefill=True)
        feeds.append(Feed(target, chunk, cache, prefill=True, last=last))
    return feeds


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_a_batched_forward_gives_each_request_what_it_gets_alone(kind, attention):
    model = build_target(kind)
    model.config.get_text_config()._attn_implementation = attention
    target = TargetModel(model)
    alone_feeds, batched_feeds = _feeds(target), _feeds(target)
    alone = [run_feed(f) for f in alone_feeds]
    together = run_batch(target, batched_feeds)
    for a, b, fa, fb in zip(alone, together, alone_feeds, batched_feeds):
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        if a.shared_kv is not None:  # the drafter's K/V: the same rows
            assert b.shared_kv is not None and b.shared_kv.keys() == a.shared_kv.keys()
            for t in a.shared_kv:
                torch.testing.assert_close(b.shared_kv[t][0], a.shared_kv[t][0], atol=1e-5, rtol=1e-5)
        for la, lb in zip(kv_layers(fa.cache), kv_layers(fb.cache)):  # each request's own cache got its rows, no padding
            if la.keys is not None:
                torch.testing.assert_close(lb.keys, la.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_greedy_blocks_get_each_rows_argmax_and_no_logits(monkeypatch, kind):
    """A block whose verdict needs only each row's argmax gets that from the forward, batched or
    alone, here taken a slice of the vocabulary at a time; the other blocks still get logits."""
    target = TargetModel(build_target(kind))
    monkeypatch.setattr(head, "SLICED_ARGMAX_ROWS", 1)
    monkeypatch.setattr(head, "ARGMAX_SLICE", 100)
    reference, batched_feeds, alone_feeds = _feeds(target), _feeds(target), _feeds(target)
    for f in (*batched_feeds[::2], *alone_feeds[::2]):
        f.greedy = True
    expected = [run_feed(f).logits for f in reference]
    for got in (run_batch(target, batched_feeds), [run_feed(f) for f in alone_feeds]):
        for fwd, feed, logits in zip(got, batched_feeds, expected):
            assert logits is not None
            if feed.greedy:
                assert fwd.logits is None and fwd.argmax is not None
                assert torch.equal(fwd.argmax, logits.argmax(-1))
            else:
                assert fwd.argmax is None and fwd.logits is not None
                torch.testing.assert_close(fwd.logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_prompt_chunks_prefill_together_as_they_prefill_alone(kind):
    """Several requests' prompt chunks (a first chunk, a later one, a last one after a cached
    prefix) in one packed forward: each request's cache, hidden rows and last-row logits are what a
    forward of its own gives. Gemma 4 targets that slice their prefill run the chunks apart."""
    target = TargetModel(build_target(kind))
    shapes = fed_shapes(target.model)

    def chunks() -> list[Feed]:
        return _chunks(target, [(0, prompt(1, 12), False), (9, prompt(2, 20), True), (30, prompt(3, 7), True)])

    alone_feeds, packed_feeds = chunks(), chunks()
    alone = [run_feed(f) for f in alone_feeds]
    shapes.clear()
    together = run_feeds(packed_feeds)
    assert [n for n, _ in shapes] == ([1, 1, 1] if target.slices_prefill else [3])
    for a, b, fa, fb in zip(alone, together, alone_feeds, packed_feeds):
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)
        assert (a.logits is None) == (b.logits is None) == (not fa.last)
        if a.logits is not None:
            assert b.logits is not None and b.logits.shape == (1, VOCAB)
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        for la, lb in zip(kv_layers(fa.cache), kv_layers(fb.cache)):
            if la.keys is not None:
                torch.testing.assert_close(lb.keys, la.keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_prompt_chunks_join_the_verification_forward_and_attend_apart(monkeypatch, kind, attention):
    """Verification blocks and prompt chunks in one forward: each request gets what its own forward
    gives, and attention runs per group, each padded to its own longest block, so a chunk does not
    pad the blocks beside it to its width. A target that slices its prefill runs the chunks apart."""
    model = build_target(kind)
    model.config.get_text_config()._attn_implementation = attention
    target = TargetModel(model)
    shapes = fed_shapes(model)
    queries: list[tuple[int, int]] = []
    sdpa, eager_of = packed._sdpa, packed._eager_of

    def recording(module, query, *args, **kwargs):
        queries.append((query.shape[0], query.shape[2]))
        return (sdpa if attention == "sdpa" else eager_of(module))(module, query, *args, **kwargs)

    def mixed() -> list[Feed]:  # three chains and a tree, then two prompt chunks
        return _feeds(target) + _chunks(target, [(0, prompt(8, 40), False), (12, prompt(9, 33), True)])

    alone_feeds, mixed_feeds = mixed(), mixed()
    alone = [run_feed(f) for f in alone_feeds]
    shapes.clear()
    if attention == "sdpa":
        monkeypatch.setattr(packed, "_sdpa", recording)
    else:
        monkeypatch.setattr(packed, "_eager_of", lambda module: lambda *a, **k: recording(*a, **k))
    together = run_feeds(mixed_feeds)
    assert [n for n, _ in shapes] == ([4, 1, 1] if target.slices_prefill else [6])
    if not target.slices_prefill:
        longest_block = max(f.width for f in mixed_feeds if not f.prefill)
        assert (4, longest_block) in queries and (2, 40) in queries and all(rows <= 40 for _, rows in queries)
        assert not any(n == 6 for n, _ in queries)  # no attention call padded blocks and chunks together
    for a, b, fa, fb in zip(alone, together, alone_feeds, mixed_feeds):
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)
        assert (a.logits is None) == (b.logits is None)
        if a.logits is not None:
            torch.testing.assert_close(b.logits, a.logits, atol=1e-4, rtol=1e-4)
        for la, lb in zip(kv_layers(fa.cache), kv_layers(fb.cache)):
            if la.keys is not None:
                torch.testing.assert_close(lb.keys, la.keys, atol=1e-5, rtol=1e-5)


def test_new_requests_prefill_together_unless_they_share_a_prompt(checkpoints, monkeypatch):
    """Requests arriving together prefill in one packed forward; one that shares SHARED_PREFIX
    tokens with a prompt still prefilling waits for it and reuses its cache."""
    engine = Engine.from_pretrained(checkpoints["gemma3"], drafter="ngram")
    shapes = fed_shapes(engine.model)
    first = prompt(40, 40)
    asks = [first, prompt(41, 25), first[: worker.SHARED_PREFIX] + prompt(42, 6), first[:10] + prompt(43, 8)]
    gate, round_ = threading.Event(), worker.EngineWorker._round

    def gated(self):  # the owner thread starts its rounds once all four are queued
        gate.wait()
        return round_(self)

    monkeypatch.setattr(worker.EngineWorker, "_round", gated)
    handles = [engine.submit(ids, max_new_tokens=8, stop_token_ids=[]) for ids in asks]
    gate.set()
    results = [h.result() for h in handles]
    for ids, result in zip(asks, results):
        assert result.token_ids == hf_greedy(engine.model, ids, 8)
    assert shapes[0] == (3, 40 + 25 + 18), shapes  # the first, second and fourth prompts in one forward
    assert results[2].stats.cached_tokens >= worker.SHARED_PREFIX and results[3].stats.cached_tokens == 0


def _sdpa_calls(monkeypatch) -> list[tuple[int, int]]:
    """(query heads, K/V heads) of every scaled_dot_product_attention call from now on: K/V heads
    beyond the model's own were repeated per query head."""
    calls: list[tuple[int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        calls.append((query.shape[1], key.shape[1]))
        return sdpa(query, key, value, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (4, 2), (8, 1)])
@torch.inference_mode()
def test_query_heads_fold_onto_their_kv_heads_as_transformers_repeats_them(monkeypatch, dtype, heads, kv_heads):
    """Several masked query rows over shared K/V heads: the folded attention gives transformers'
    output, without repeating K/V, in bf16; float32 keeps transformers' own path."""
    g = torch.Generator().manual_seed(heads + kv_heads)
    query = torch.randn(3, heads, 5, 16, generator=g).to(dtype)
    key, value = (torch.randn(3, kv_heads, 9, 16, generator=g).to(dtype) for _ in range(2))
    mask = torch.rand(3, 1, 5, 9, generator=g) > 0.4
    mask[..., 0] = True
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)  # what sdpa reads of the module
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    calls = _sdpa_calls(monkeypatch)
    out, _ = packed._sdpa(module, query, key, value, mask, scaling=0.25)
    assert out.shape == expected.shape == (3, 5, heads, 16)
    torch.testing.assert_close(out, expected)
    assert calls == [(kv_heads, kv_heads) if dtype == torch.bfloat16 else (heads, heads)]


@torch.inference_mode()
def test_padded_kv_is_each_request_then_zeros_in_reused_memory():
    """The batch's padded K/V: each request's rows, then exact zeros, even where the allocator hands
    back memory that held NaNs (a masked padding value must stay finite: 0 * NaN poisons a row)."""
    rows = [torch.randn(1, 2, n, 8) for n in (5, 9, 2)]
    for _ in range(20):  # free NaN-filled blocks of the padded tensor's size for the allocator to reuse
        torch.full((3, 2, 9, 8), float("nan"))
        padded = batch._pad(rows)
        assert torch.equal(padded, torch.cat([F.pad(r, (0, 0, 0, 9 - r.shape[-2])) for r in rows]))


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_a_bf16_verification_forward_attends_through_the_fold(monkeypatch, kind):
    """The engine's verification forwards, alone and batched, read K/V in place in bf16 (no K/V
    repeated per query head) and give the hidden rows of transformers' own sdpa."""
    target = TargetModel(build_target(kind).to(torch.bfloat16))
    chains = [[f for f in _feeds(target) if f.tree is None] for _ in range(4)]
    own = [target.decoder(input_ids=torch.tensor([f.tokens]), **{target._cache_kw: f.cache}).last_hidden_state[0] for f in chains[0]]
    calls = _sdpa_calls(monkeypatch)
    alone = [run_feed(f).hidden for f in chains[1]]
    together = run_batch(target, chains[2])
    assert calls and all(kv == target.config.num_key_value_heads for _, kv in calls), calls  # K/V as stored
    monkeypatch.setattr(packed, "_sdpa", sdpa_attention_forward)  # the same packed forward, transformers' attention
    unfolded = run_batch(target, chains[3])
    for mine, theirs in zip(alone, own):
        torch.testing.assert_close(mine, theirs)
    for mine, theirs in zip(together, unfolded):
        torch.testing.assert_close(mine.hidden, theirs.hidden)


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_mtp_drafts_in_a_batch_as_it_drafts_alone(checkpoints, kind):
    engine = Engine.from_pretrained(checkpoints[kind], drafter="mtp")
    drafter, target = engine.drafter, engine.target
    assert isinstance(drafter, MTPDrafter)
    sizes: list[int] = []
    drafter.assistant.model.register_forward_hook(lambda m, a, kw, o: sizes.append(kw["inputs_embeds"].shape[0]), with_kwargs=True)
    steps = []
    for length, k in [(9, 3), (30, 1), (14, 5)]:
        ids = prompt(length, length)
        cache = target.new_cache()
        fwd = target.forward(ids, cache, prefill=True)
        kv = target.rollback(cache, fwd, 0)
        steps.append(DraftStep(DraftRequest(len(ids)), ids + [7], k, k, fwd.hidden[-1:].unsqueeze(0), kv))
    alone = [drafter.propose(s) for s in steps]
    together = drafter.propose_many([(drafter, s) for s in steps])
    assert max(sizes) == len(steps)  # the assistant ran the three requests as one batch
    assert [d.tokens for d in together] == [d.tokens for d in alone]
    assert [d.alternatives for d in together] == [d.alternatives for d in alone]


@torch.inference_mode()
def test_a_draft_model_drafts_in_a_batch_as_it_drafts_alone():
    draft = TargetModel(build_target("noshare", seed=7))
    drafter = DraftModelDrafter(draft)
    shapes = fed_shapes(draft.model)

    def steps() -> list[tuple[object, DraftStep]]:
        out = []
        for length, k in [(9, 3), (30, 1), (14, 5)]:
            request = DraftRequest(length)
            out.append((drafter.open(request), DraftStep(request, prompt(length, length) + [7], k, k)))
        return out

    alone = [session.propose(step) for session, step in steps()]
    batched_items = steps()
    shapes.clear()
    together = drafter.propose_many(batched_items)
    assert [d.tokens for d in together] == [d.tokens for d in alone]
    assert shapes[0] == (3, 10 + 31 + 15)  # the three prompts in one forward
    assert max(n for n, _ in shapes[1:]) >= 2  # later draft steps of several requests went through one forward
    # The next step catches up after a partial accept, as after verification.
    for (session, step), d in zip(batched_items, together):
        session.commit([*step.tokens, *d.tokens[:1], 3], 1)
    again = drafter.propose_many(
        [(s, DraftStep(st.request, [*st.tokens, *d.tokens[:1], 3], 2, 2)) for (s, st), d in zip(batched_items, together)]
    )
    reference = steps()
    for (session, step), d in zip(reference, alone):
        session.propose(step)
        session.commit([*step.tokens, *d.tokens[:1], 3], 1)
    assert [d.tokens for d in again] == [
        s.propose(DraftStep(st.request, [*st.tokens, *d.tokens[:1], 3], 2, 2)).tokens for (s, st), d in zip(reference, alone)
    ]


def _engines(checkpoints, kind: str) -> dict[str, Engine]:
    """Engines with every drafter on one target model: their requests verify in the same forwards."""
    mtp = Engine.from_pretrained(checkpoints[kind], drafter="mtp")
    assert isinstance(mtp.drafter, MTPDrafter)
    return {
        "mtp": mtp,
        "ngram": Engine(mtp.target, NgramDrafter()),
        "hybrid": Engine(mtp.target, HybridDrafter(mtp.drafter, NgramDrafter())),
        "draft_model": Engine(mtp.target, DraftModelDrafter(TargetModel(build_target("noshare", seed=7)))),
        "none": Engine(mtp.target, NoDrafter()),
    }


@pytest.mark.parametrize("sliced", [False, True], ids=["argmax-whole", "argmax-sliced"])
@pytest.mark.parametrize("kind", KINDS)
def test_mixed_requests_in_flight_together_match_plain_greedy(checkpoints, monkeypatch, kind, sliced):
    """Different drafters, prompt lengths, draft lengths, hints and max_new_tokens, one request
    joining mid-flight: each output is transformers' greedy output, and forwards were shared;
    also with every verified row's greedy token taken a slice of the vocabulary at a time."""
    greedy_rows: list[int] = []
    if sliced:
        monkeypatch.setattr(head, "SLICED_ARGMAX_ROWS", 1)
        monkeypatch.setattr(head, "ARGMAX_SLICE", 100)
        greedy = TargetModel.greedy
        monkeypatch.setattr(TargetModel, "greedy", lambda self, hidden: greedy_rows.append(len(hidden)) or greedy(self, hidden))
    engines = _engines(checkpoints, kind)
    model = engines["mtp"].model
    shapes = fed_shapes(model)
    asks = [
        ("mtp", prompt(1, 30), 24, dict(num_draft_tokens=3)),
        ("ngram", prompt(2, 12), 16, dict(draft_hint="code")),
        ("hybrid", prompt(3, 45), 30, {}),
        ("draft_model", prompt(4, 20), 10, dict(num_draft_tokens=5)),
        ("draft_model", prompt(7, 16), 14, {}),
        ("none", prompt(5, 8), 20, {}),
        ("mtp", prompt(6, 25), 12, dict(draft_hint=2)),
    ]
    handles = [engines[e].submit(ids, max_new_tokens=n, stop_token_ids=[], **kw) for e, ids, n, kw in asks[:-1]]
    first = iter(handles[0])
    next(first), next(first)  # the last request joins while the others run
    e, ids, n, kw = asks[-1]
    handles.append(engines[e].submit(ids, max_new_tokens=n, stop_token_ids=[], **kw))
    for (e, ids, n, _), handle in zip(asks, handles):
        result = handle.result()
        assert result.token_ids == hf_greedy(model, ids, n), f"{kind}/{e}"
        assert result.stats.steps == len(result.stats.draft_lengths) and len(result.token_ids) == n
    assert max(n for n, _ in shapes) >= 3, shapes  # verification blocks of several requests went through one forward
    assert not sliced or max(greedy_rows) > 5  # the greedy requests' rows did take the sliced path, several requests' at once


def test_a_batched_forward_tells_the_plans_how_many_share_it(checkpoints, monkeypatch):
    """The cost model hears how many requests each verification forward verified, and the next
    plans are priced with that share (tests/unit/test_costs.py has the pricing itself). A forward
    that also carried a prompt chunk prices no width (those rows skip the LM head)."""
    engine = Engine.from_pretrained(checkpoints["gemma3"], drafter="ngram")
    costs = engine.scheduler.costs
    for width in range(1, 4 * MIN_FORWARDS):  # measured costs from the start: the plans use them
        costs.observe_forward(width, 0.01 + 0.001 * width)
        costs.observe_draft(MIN_DRAFTS, 1e-4)
    heard: list[tuple[int, int | None]] = []
    observe = costs.observe_forward
    shares: list[float] = []
    relative = costs.relative

    def spy_observe(width, seconds, requests=None):
        heard.append((width, requests))
        observe(width, seconds, requests)

    def spy_relative():
        shares.append(relative().share)
        return relative()

    monkeypatch.setattr(costs, "observe_forward", spy_observe)
    monkeypatch.setattr(costs, "relative", spy_relative)
    handles = [engine.submit(prompt(s, 10 + 3 * s), max_new_tokens=24, stop_token_ids=[], draft_hint="code") for s in range(4)]
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(worker, "PREFILL_CHUNK", 16)
    next(iter(handles[0]))  # a long prompt arrives while the others stream: its chunks join their forwards
    handles.append(engine.submit(prompt(9, 120), max_new_tokens=4, stop_token_ids=[]))
    for h in handles:
        h.result()
    requests = [r for _, r in heard]
    assert None not in requests and max(r for r in requests if r is not None) >= 4  # all four in one forward, at least once
    assert 0.25 in shares  # a plan priced while four shared the forwards (once measured)
    assert any(w == 0 for w, _ in heard) and any(w > 0 for w, _ in heard)  # chunk-carrying forwards priced no width


class FailsOn(StatelessDrafter):
    """N-gram-free drafting that raises for a request whose prompt holds `marker` (a failing drafter)."""

    name = "fails-on"
    cost_per_draft_token = 0.1

    def __init__(self, marker: int):
        self.marker = marker

    def propose(self, step):
        if self.marker in step.tokens[: step.request.prompt_len]:
            raise RuntimeError("this drafter fails on this request")
        return Draft([step.tokens[-1]])


def test_a_failing_drafter_fails_its_request_alone(checkpoints):
    engines = _engines(checkpoints, "shared_ple")
    failing = Engine(engines["none"].target, FailsOn(marker=VOCAB - 1))
    bad = prompt(7, 10) + [VOCAB - 1]
    good = [prompt(8, 10), prompt(9, 14)]
    handles = [failing.submit(bad, max_new_tokens=12, stop_token_ids=[])]
    handles += [
        failing.submit(good[0], max_new_tokens=12, stop_token_ids=[]),
        engines["ngram"].submit(good[1], max_new_tokens=12, stop_token_ids=[]),
    ]
    with pytest.raises(RuntimeError, match="fails on this request"):
        handles[0].result()
    model = engines["none"].model
    assert handles[1].result().token_ids == hf_greedy(model, good[0], 12)
    assert handles[2].result().token_ids == hf_greedy(model, good[1], 12)


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(checkpoints):
    engines = _engines(checkpoints, "gemma3")
    ids = [prompt(10 + i, 15 + i) for i in range(3)]
    handles = [engines["mtp"].submit(p, max_new_tokens=30, stop_token_ids=[]) for p in ids]
    next(iter(handles[1]))
    handles[1].cancel()
    left = list(handles[1])  # ends within a round: at most the bursts already verified
    assert len(handles[1].token_ids) < 30 and all(b.finish_reason is None for b in left)
    for i in (0, 2):
        assert handles[i].result().token_ids == hf_greedy(engines["mtp"].model, ids[i], 30)


class Recorder(StatelessDrafter):
    """Drafts one wrong token and records which request (by prompt length) drafted, in order."""

    name = "recorder"
    cost_per_draft_token = 0.1

    def __init__(self):
        self.order: list[int] = []
        self.lock = threading.Lock()

    def propose(self, step):
        with self.lock:
            self.order.append(step.request.prompt_len)
        return Draft([(step.tokens[-1] + 1) % VOCAB])


def test_requests_over_the_batch_limit_take_turns(checkpoints, monkeypatch):
    monkeypatch.setattr(worker, "MAX_BATCH_ROWS", 1)  # one request verified per forward
    engines = _engines(checkpoints, "noshare")
    recorder = Recorder()
    engine = Engine(engines["none"].target, recorder)
    shapes = fed_shapes(engine.model)
    ids = [prompt(20 + i, 10 + i) for i in range(3)]
    handles = [engine.submit(p, max_new_tokens=16, stop_token_ids=[], num_draft_tokens=1) for p in ids]
    for p, h in zip(ids, handles):
        assert h.result().token_ids == hf_greedy(engine.model, p, 16)
    # Verification forwards (2 tokens each: the pending one and its draft) held one request; the
    # three prompts (10-12 tokens) prefilled together.
    assert max(n for n, fed in shapes if fed == 2) == 1, shapes
    # While all three run, every request steps once before any steps again.
    steps = recorder.order[3:30]
    for i in range(0, len(steps) - 2, 3):
        assert len(set(steps[i : i + 3])) == 3, recorder.order


def test_a_long_prompt_prefills_in_chunks_while_others_stream(checkpoints, monkeypatch):
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(worker, "PREFILL_CHUNK", 16)
    engines = _engines(checkpoints, "conditional")
    engine = engines["ngram"]
    fed = fed_shapes(engine.model)
    streaming = engine.submit(prompt(30, 10), max_new_tokens=40, stop_token_ids=[], num_draft_tokens=0)
    next(iter(streaming))
    long_ids = prompt(31, 120)
    long = engine.submit(long_ids, max_new_tokens=5, stop_token_ids=[])
    assert long.result().token_ids == hf_greedy(engine.model, long_ids, 5)
    assert streaming.result().token_ids == hf_greedy(engine.model, prompt(30, 10), 40)
    chunks = [i for i, shape in enumerate(fed) if shape[1] == 16]
    assert len(chunks) >= 6  # the 120-token prompt went in 16-token chunks
    # Between consecutive chunks the streaming request was verified: its stream kept moving.
    assert all(any(fed[j] == (1, 1) for j in range(a + 1, b)) for a, b in itertools.pairwise(chunks)), fed


class Gate(StatelessDrafter):
    """Drafts nothing; its first call holds the owner thread until the test opens it, so requests
    submitted meanwhile all wait for the same round."""

    name = "gate"
    cost_per_draft_token = 0.1

    def __init__(self):
        self.entered, self.opened = threading.Event(), threading.Event()

    def propose(self, step):
        self.entered.set()
        assert self.opened.wait(30)
        return Draft([])


@pytest.mark.parametrize("kind", ["noshare", "shared_ple"])  # chunks packed with the blocks; each in a forward of its own
def test_a_burst_of_new_prompts_prefills_several_chunks_a_round(checkpoints, monkeypatch, kind):
    monkeypatch.setattr(loop, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(worker, "PREFILL_CHUNK", 16)
    engines = _engines(checkpoints, kind)
    gate, model = Gate(), engines["none"].model
    fed = fed_shapes(model)
    streaming = Engine(engines["none"].target, gate).submit(prompt(40, 10), max_new_tokens=6, stop_token_ids=[])
    assert gate.entered.wait(30)
    ids = [prompt(41 + i, 12) for i in range(6)]
    plain = Engine(engines["none"].target, NoDrafter(), prefix_cache_mb=0)  # every prompt prefilled whole
    burst = [plain.submit(p, max_new_tokens=5, stop_token_ids=[]) for p in ids]
    gate.opened.set()
    for p, h in zip(ids, burst):
        assert h.result().token_ids == hf_greedy(model, p, 5)
    assert streaming.result().token_ids == hf_greedy(model, prompt(40, 10), 6)
    # Six 12-token prompts waiting: a round's budget is PREFILL_ROUND_CHUNKS (2) chunks' worth, 32
    # tokens, so they started two a round (one chunk's budget, 16 tokens, takes one a round), beside
    # the stream's 1-row block and the 1-row blocks of those started before.
    if engines["none"].target.slices_prefill:
        rounds = [(1, 1), (1, 12), (1, 12), (3, 3), (1, 12), (1, 12), (5, 5), (1, 12), (1, 12)]
        assert any(fed[i : i + len(rounds)] == rounds for i in range(len(fed))), fed
    else:
        started = [(3, 1 + 24), (5, 3 + 24), (7, 5 + 24)]
        assert [shape for shape in fed if shape in started] == started, fed


def test_sampling_with_batch_partners_keeps_the_target_distribution(small_target):
    model, assistant = small_target
    engine = Engine(model, MTPDrafter(assistant, TargetModel(model), stop_below=0.0))
    shapes = fed_shapes(model)
    sampling = SamplingParams(1.0, 1.0, 0)
    target_prompt, n_tokens = [2, 5, 9, 5, 9, 3, 7], 3
    exact = exact_marginals(model, target_prompt, n_tokens, lambda ids, logits: process_logits(logits, sampling))
    draws: list[list[int]] = [[] for _ in range(n_tokens)]
    for seed in range(1000):
        measured = engine.submit(
            target_prompt, max_new_tokens=n_tokens + 1, temperature=1.0, seed=seed, num_draft_tokens=3, stop_token_ids=[]
        )
        partners = [
            engine.submit([2, 8, 4], max_new_tokens=6, stop_token_ids=[]),
            engine.submit([2, 6, 6, 6, 1], max_new_tokens=5, temperature=0.7, seed=seed + 1, stop_token_ids=[]),
        ]
        result = measured.result()
        for p in partners:
            p.result()
        for i in range(n_tokens):
            draws[i].append(result.token_ids[i])
    assert max(n for n, _ in shapes) >= 2
    for i in range(n_tokens):
        assert _chi2_ok(draws[i], exact[i].float()) > P_MIN, f"token {i + 1} off the target's distribution"


def test_a_seeded_request_reproduces_whatever_else_is_in_the_batch(small_target):
    model, assistant = small_target
    mtp = MTPDrafter(assistant, TargetModel(model), stop_below=0.0)
    engine = Engine(model, HybridDrafter(mtp, NgramDrafter()))
    kwargs = dict(max_new_tokens=24, temperature=1.0, seed=123, stop_token_ids=[])
    alone = engine.generate([2, 5, 9], **kwargs).token_ids
    for partners in ([([2, 7], {})], [([2, 7, 7, 7], dict(temperature=0.9, seed=5)), ([3, 4], {}), ([9], dict(num_draft_tokens=1))]):
        handles = [engine.submit([2, 5, 9], **kwargs)] + [
            engine.submit(p, max_new_tokens=20, stop_token_ids=[], **kw) for p, kw in partners
        ]
        assert handles[0].result().token_ids == alone
        for h in handles[1:]:
            h.result()
