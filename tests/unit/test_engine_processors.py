"""Logits processors (penalties, logit bias, min_p, min_tokens): speculative output is exactly plain
decoding with the same processors, which is what transformers' own processors give."""

from __future__ import annotations

import re

import pytest
import torch
from test_engine_sampling import P_MIN, _chi2_ok, exact_marginals
from tiny_models import VOCAB, build_assistant, build_target
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import DraftModelDrafter, HybridDrafter, MTPDrafter, NgramDrafter, NoDrafter
from langchain_gemma_mtp.engine.processors import row_paths
from langchain_gemma_mtp.engine.target import TargetModel
from langchain_gemma_mtp.engine.tree import DraftTree
from langchain_gemma_mtp.engine.types import SamplingParams
from langchain_gemma_mtp.engine.verify import process_logits
from langchain_gemma_mtp.errors import InvalidRequestError

NEW_TOKENS = 30


class FrequencyPresence(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the generated tokens, written out plainly:
    transformers has no processor for them."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        for row, ids in enumerate(input_ids[:, self.prompt_len :].tolist()):
            for token in set(ids):
                scores[row, token] -= self.frequency * ids.count(token) + self.presence
        return scores


def reference_processors(prompt_len: int, end: list[int], kw: dict) -> LogitsProcessorList:
    """transformers' processors for `kw`, in the engine's (vLLM's) order: bias, min_tokens, repetition,
    frequency/presence."""
    procs = LogitsProcessorList()
    if kw.get("logit_bias"):
        procs.append(SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in kw["logit_bias"].items()]))
    if kw.get("min_tokens"):
        procs.append(MinNewTokensLengthLogitsProcessor(prompt_len, kw["min_tokens"], end))
    if kw.get("repetition_penalty", 1.0) != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(kw["repetition_penalty"]))
    if kw.get("frequency_penalty") or kw.get("presence_penalty"):
        procs.append(FrequencyPresence(prompt_len, kw.get("frequency_penalty", 0.0), kw.get("presence_penalty", 0.0)))
    return procs


def hf_greedy(model, ids: list[int], end: list[int], kw: dict) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=end or None,
            pad_token_id=0,
            logits_processor=reference_processors(len(ids), end, kw),
        )
    return out[0, len(ids) :].tolist()


def prompt(seed: int) -> list[int]:
    """A prompt that repeats itself, so n-gram drafting proposes something at most steps."""
    g = torch.Generator().manual_seed(seed)
    piece = torch.randint(3, VOCAB, (8,), generator=g).tolist()
    return [2, *piece, *piece, *piece[:5]]


@pytest.fixture(scope="module", params=["shared_ple", "gemma3"])
def engines(request):
    model = build_target(request.param)
    assistant = build_assistant(model, ordered=True)
    mtp = MTPDrafter(assistant, TargetModel(model), stop_below=0.0, siblings_per_depth=0)
    return {
        "none": Engine(model, NoDrafter()),
        "ngram": Engine(model, NgramDrafter()),
        "mtp": Engine(model, mtp),
        # Greedy MTP drafts become trees: three runners-up per depth verified beside the chain.
        "mtp-tree": Engine(model, MTPDrafter(assistant, TargetModel(model), stop_below=0.0, siblings_per_depth=3)),
        "hybrid": Engine(model, HybridDrafter(mtp, NgramDrafter(), min_match=1)),
        "draft_model": Engine(model, DraftModelDrafter(TargetModel(build_target("noshare", seed=7)))),
    }


def settings(engines, seed: int) -> dict[str, tuple[list[int], dict]]:
    """Processor settings that each change the plain greedy answer of `prompt(seed)`, by name:
    (stop ids, kwargs). min_tokens makes the first plain token the stop token, so it matters."""
    plain = engines["none"].generate(prompt(seed), max_new_tokens=NEW_TOKENS, stop_token_ids=[]).token_ids
    top = plain[0]
    return {
        "repetition": ([], {"repetition_penalty": 1.8}),
        "repetition-below-1": ([], {"repetition_penalty": 0.6}),
        "frequency": ([], {"frequency_penalty": 1.5}),
        "presence": ([], {"presence_penalty": 2.0}),
        "bias": ([], {"logit_bias": {top: -100, (top + 7) % VOCAB: 3.0}}),
        "min_tokens": ([top], {"min_tokens": 6}),
        "all": (
            [top],
            {
                "repetition_penalty": 1.3,
                "frequency_penalty": 0.7,
                "presence_penalty": 0.4,
                "logit_bias": {plain[1]: -5.0, 7: 2.0},
                "min_tokens": 3,
                "min_p": 0.2,
            },
        ),
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_plain_decoding_with_processors_is_transformers_own(engines, seed):
    plain = engines["none"].generate(prompt(seed), max_new_tokens=NEW_TOKENS, stop_token_ids=[]).token_ids
    for name, (end, kw) in settings(engines, seed).items():
        out = engines["none"].generate(prompt(seed), max_new_tokens=NEW_TOKENS, stop_token_ids=end, **kw).token_ids
        assert out == hf_greedy(engines["none"].model, prompt(seed), end, kw), name
        if name != "repetition-below-1":  # it encourages repeats: a repetitive answer may stay as it is
            assert out != plain, f"{name} should change this answer"


@pytest.fixture(scope="module")
def plain_outputs(engines):
    """Plain decoding (no drafter) of each prompt with each setting: (stop ids, kwargs, tokens, finish)."""
    cases = {}
    for seed in (1, 2):
        for name, (end, kw) in settings(engines, seed).items():
            plain = engines["none"].generate(prompt(seed), max_new_tokens=NEW_TOKENS, stop_token_ids=end, **kw)
            cases[seed, name] = (end, kw, plain.token_ids, plain.finish_reason)
    return cases


@pytest.mark.parametrize("drafter", ["ngram", "mtp", "mtp-tree", "hybrid", "draft_model"])
@pytest.mark.parametrize("k", [1, 5])
def test_speculative_greedy_with_processors_is_plain(engines, plain_outputs, drafter, k):
    for (seed, name), (end, kw, tokens, finish) in plain_outputs.items():
        out = engines[drafter].generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=k, stop_token_ids=end, **kw)
        assert out.token_ids == tokens, f"{drafter}/k={k}/{name}/prompt {seed}"
        assert out.finish_reason == finish


def test_trees_really_verified_siblings(engines, plain_outputs):
    """The tree engine verifies siblings on these prompts (else the tree case above tests nothing)."""
    siblings = 0
    for (seed, _), (end, kw, _, _) in plain_outputs.items():
        siblings += (
            engines["mtp-tree"]
            .generate(prompt(seed), max_new_tokens=NEW_TOKENS, num_draft_tokens=4, stop_token_ids=end, **kw)
            .stats.sibling_tokens
        )
    assert siblings > 0


def test_row_paths_follow_the_tree():
    assert row_paths([10, 11, 12]) == [[], [10], [10, 11], [10, 11, 12]]
    tree = DraftTree([10, 11, 12], [[20, 21], [], [22]])
    assert row_paths([10, 11, 12], tree) == [[], [10], [10, 11], [10, 11, 12], [20], [21], [10, 11, 22]]


@pytest.mark.parametrize(
    "sampling", [SamplingParams(0.7, 1.0, 0, 0.1), SamplingParams(1.3, 0.9, 0, 0.05), SamplingParams(1.0, 0.8, 20, 0.02)]
)
def test_min_p_is_transformers_min_p(sampling):
    """min_p after temperature and before top-k/top-p (vLLM's order), as transformers' warpers give."""
    logits = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    warpers = [TemperatureLogitsWarper(sampling.temperature), MinPLogitsWarper(sampling.min_p)]
    if sampling.top_k:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    expected = LogitsProcessorList(warpers)(torch.zeros(4, 1, dtype=torch.long), logits.clone()).softmax(-1)
    got = process_logits(logits, sampling)
    assert torch.allclose(got, expected, atol=1e-6)
    assert (got == 0).sum() > (process_logits(logits, SamplingParams(sampling.temperature, sampling.top_p, sampling.top_k)) == 0).sum()


# -- sampling: the processed distribution is kept ----------------------------------------------------

PENALTIES = {"repetition_penalty": 1.6, "frequency_penalty": 0.8, "presence_penalty": 0.5, "logit_bias": {3: 1.5, 4: -100.0}}
SAMPLED = SamplingParams(1.0, 1.0, 0, 0.05)
SAMPLED_DRAWS = 1200


def exact_processed_marginals(model, ids: list[int], n: int) -> list[torch.Tensor]:
    """Exact marginals of the first n sampled tokens under plain decoding with transformers' processors."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(SAMPLED.temperature), MinPLogitsWarper(SAMPLED.min_p)])

    def probs_of(batch: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return warp(batch, reference_processors(len(ids), [], PENALTIES)(batch, logits.float())).softmax(-1)

    return exact_marginals(model, ids, n, probs_of)


@pytest.mark.parametrize("drafter", ["mtp", "ngram"])
def test_speculative_sampling_keeps_the_processed_distribution(small_target, drafter):
    model, assistant = small_target
    engine = Engine(model, MTPDrafter(assistant, TargetModel(model), stop_below=0.0) if drafter == "mtp" else NgramDrafter())
    ids = [2, 5, 9, 5, 9, 3, 7, 5, 9]
    n_tokens = 3
    exact = exact_processed_marginals(model, ids, n_tokens)
    draws = [[] for _ in range(n_tokens)]
    drafted = 0
    for seed in range(SAMPLED_DRAWS):
        result = engine.generate(
            ids,
            max_new_tokens=n_tokens + 1,
            temperature=SAMPLED.temperature,
            min_p=SAMPLED.min_p,
            seed=seed,
            num_draft_tokens=3,
            stop_token_ids=[],
            **PENALTIES,
        )
        drafted += result.stats.drafted
        for i in range(n_tokens):
            draws[i].append(result.token_ids[i])
    assert drafted >= SAMPLED_DRAWS
    unprocessed = exact_marginals_without_processors(model, ids)
    assert not torch.allclose(exact[0], unprocessed, atol=0.05)  # the processors matter here
    for i in range(n_tokens):
        assert 4 not in draws[i]  # banned by its bias
        assert _chi2_ok(draws[i], exact[i].float()) > P_MIN, f"token {i + 1} off the processed distribution"


def exact_marginals_without_processors(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].double().softmax(-1)


def test_seeded_request_with_processors_reproduces(small_target):
    model, assistant = small_target
    engine = Engine(model, MTPDrafter(assistant, TargetModel(model), stop_below=0.0))
    kw = dict(max_new_tokens=24, temperature=1.0, min_p=0.05, num_draft_tokens=3, stop_token_ids=[], **PENALTIES)
    runs = [engine.generate([2, 5, 9, 5, 9], seed=s, **kw).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,named",
    [
        ({"logit_bias": {VOCAB: 1.0}}, "logit_bias key"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias key"),
        ({"logit_bias": {5: -101}}, "logit_bias[5]"),
        ({"logit_bias": {5: float("nan")}}, "logit_bias[5]"),
        ({"logit_bias": [5]}, "logit_bias must map"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"presence_penalty": "1"}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": None}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 2.0}, "min_tokens"),
        ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens (9) is over max_new_tokens"),
    ],
)
def test_bad_processor_arguments_are_named_before_any_forward(engines, kw, named):
    engine = engines["none"]
    with pytest.raises(InvalidRequestError, match=re.escape(named)):
        engine.submit([2, 5, 9], **kw)
