"""Prompt-lookup drafting: which occurrence is copied and how much of it."""

from langchain_gemma_mtp.engine.drafters import lookup_continuation


def test_copies_after_the_longest_matching_occurrence():
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 7, 2, 3, 4, 5, 6, 1, 2, 3]
    # Suffix [1, 2, 3] matches at 0..2 (3 tokens), [2, 3] alone at 5..6: both leave 4 tokens to
    # copy, so the longer match wins.
    assert lookup_continuation(tokens, 4) == [9, 7, 2, 3]


def test_most_recent_occurrence_wins_ties():
    tokens = [5, 1, 5, 2, 5]
    assert lookup_continuation(tokens, 1) == [2]


def test_draft_capped_by_k_and_by_what_follows():
    tokens = [4, 8, 9, 10, 11, 12, 13, 4]
    assert lookup_continuation(tokens, 3) == [8, 9, 10]
    assert lookup_continuation(tokens, 10) == [8, 9, 10, 11, 12, 13, 4]


def test_no_match_or_nothing_asked():
    assert lookup_continuation([1, 2, 3], 4) == []
    assert lookup_continuation([1, 2, 1], 0) == []
    assert lookup_continuation([7], 4) == []
    assert lookup_continuation([1, 2, 1], 4, min_ngram=2) == []


def test_a_repeating_run_drafts_the_whole_k():
    # The most recent occurrence of [..., 5, 5] is one token from the end; an earlier one has room.
    assert lookup_continuation([3, 5, 5, 5, 5, 5, 5], 4) == [5, 5, 5, 5]
