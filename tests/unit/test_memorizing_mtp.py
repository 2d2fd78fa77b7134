"""A memorizing tiny target with a drafter distilled in seconds: high acceptance, few target forwards.

Plumbing only: the target memorized three token transcripts, so what is measured is that the
MTP path carries the target's state correctly, not how well a drafter generalizes.
"""

from __future__ import annotations

import pytest
from tiny_models import build_assistant, build_target, save

from langchain_gemma_mtp.distill import distill_assistant
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import HybridDrafter, MTPDrafter, NgramDrafter
from langchain_gemma_mtp.engine.drafters.hybrid import PRIOR_VALUE
from langchain_gemma_mtp.engine.target import TargetModel


@pytest.fixture(scope="module")
def distilled(memorizing_target, memorized_sequences):
    target = TargetModel(memorizing_target)
    untrained = build_assistant(memorizing_target, ordered=False, seed=4)
    trained = build_assistant(memorizing_target, ordered=False, seed=4)
    losses = distill_assistant(trained, target, memorized_sequences, steps=120, draft_steps=4)
    assert losses[-1] < losses[0] / 5
    return untrained, trained


def test_memorizing_target_with_distilled_drafter(memorizing_target, memorized_sequences, distilled):
    untrained, trained = distilled
    target = TargetModel(memorizing_target)
    plain = Engine(memorizing_target)
    fast = Engine(memorizing_target, MTPDrafter(trained, target))
    slow = Engine(memorizing_target, MTPDrafter(untrained, target))
    for seq in memorized_sequences:
        head, tail = seq[:8], seq[8:]
        expected = plain.generate(head, max_new_tokens=80).token_ids
        assert expected == tail  # the fixture memorized its transcript, EOS included
        result = fast.generate(head, max_new_tokens=80, num_draft_tokens=4)
        assert result.token_ids == expected and result.finish_reason == "stop"
        assert result.stats.acceptance_rate > 0.8
        assert result.stats.target_forwards < len(result.token_ids) / 2
        baseline = slow.generate(head, max_new_tokens=80, num_draft_tokens=4)
        assert baseline.token_ids == expected
        assert baseline.stats.acceptance_rate < result.stats.acceptance_rate - 0.5


def test_distilled_drafter_saves_and_reloads(memorizing_target, memorized_sequences, distilled, tmp_path):
    _, trained = distilled
    save(memorizing_target, tmp_path / "mem")
    save(trained, tmp_path / "mem-assistant")
    engine = Engine.from_pretrained(tmp_path / "mem", drafter="mtp")
    assert engine.drafter.name == "mtp"
    in_memory = Engine(memorizing_target, MTPDrafter(trained, TargetModel(memorizing_target)))
    seq = memorized_sequences[1]
    a = engine.generate(seq[:8], max_new_tokens=80, num_draft_tokens=4)
    b = in_memory.generate(seq[:8], max_new_tokens=80, num_draft_tokens=4)
    assert a.token_ids == b.token_ids == seq[8:]
    assert a.stats.draft_lengths == b.stats.draft_lengths and a.stats.accepted == b.stats.accepted


def test_stopping_early_cuts_unsure_drafts_only(memorizing_target, memorized_sequences, distilled):
    """Plumbing (memorized transcripts): with stop_below, the untrained drafter's unsure drafts are
    cut short, the distilled drafter's sure ones are kept, and the output stays the target's."""
    untrained, trained = distilled
    target = TargetModel(memorizing_target)
    plain = Engine(memorizing_target)
    totals = {}
    for name, assistant in (("untrained", untrained), ("trained", trained)):
        for stop_below in (0.0, 0.3):
            engine = Engine(memorizing_target, MTPDrafter(assistant, target, stop_below=stop_below))
            drafted = accepted = 0
            for seq in memorized_sequences:
                result = engine.generate(seq[:8], max_new_tokens=80, num_draft_tokens=4)
                assert result.token_ids == plain.generate(seq[:8], max_new_tokens=80).token_ids
                drafted, accepted = drafted + result.stats.drafted, accepted + result.stats.accepted
            totals[name, stop_below] = drafted, accepted
    assert totals["untrained", 0.3][0] < 0.6 * totals["untrained", 0.0][0], totals
    assert totals["trained", 0.3][1] >= 0.9 * totals["trained", 0.0][1], totals


def test_stop_below_out_of_range_is_refused(memorizing_target, distilled):
    with pytest.raises(ValueError, match="stop_below"):
        MTPDrafter(distilled[1], TargetModel(memorizing_target), stop_below=1.0)


def test_hybrid_copies_short_matches_only_when_they_beat_the_drafter(memorizing_target, memorized_sequences, distilled):
    """Plumbing: hybrid's choice between a short n-gram match and an MTP draft follows what each
    was worth, and the output is the target's either way. A random tiny target that loops on one
    token, with an untrained drafter: short copies win after a step or two. The memorizing target
    (memorized transcripts) with its distilled drafter: MTP keeps drafting past short matches."""
    looping = build_target("shared_ple", seed=5)
    weak = HybridDrafter(MTPDrafter(build_assistant(looping, ordered=True, seed=1), TargetModel(looping)), NgramDrafter())
    prompt = [2, 5, 9, 11, 13]
    result = Engine(looping, weak).generate(prompt, max_new_tokens=64, num_draft_tokens=4, stop_token_ids=[])
    assert result.token_ids == Engine(looping).generate(prompt, max_new_tokens=64, stop_token_ids=[]).token_ids
    assert weak.choices["short"] > weak.choices["mtp"] + weak.choices["mtp_over_short"], weak.choices
    assert weak.worth["ngram"].mean > weak.worth["mtp"].mean

    strong = HybridDrafter(MTPDrafter(distilled[1], TargetModel(memorizing_target)), NgramDrafter())
    engine = Engine(memorizing_target, strong)
    plain = Engine(memorizing_target)
    for seq in memorized_sequences:
        result = engine.generate(seq[:8], max_new_tokens=80, num_draft_tokens=4)
        assert result.token_ids == plain.generate(seq[:8], max_new_tokens=80).token_ids
    assert strong.choices["mtp_over_short"] > 3 * strong.choices["short"], strong.choices
    engine.forget()
    assert strong.worth["mtp"].mean == PRIOR_VALUE["mtp"]  # forget drops what was learned
