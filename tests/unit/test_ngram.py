"""N-gram drafting: which occurrence is copied, how much of it, and the cross-call suffix index."""

from langchain_gemma_mtp.engine.drafters import Draft, DraftRequest, DraftStep, Match, NgramDrafter, SuffixIndex, lookup_continuation
from langchain_gemma_mtp.engine.drafters.ngram import INDEX_CONTEXT, MAX_MATCH


def test_copies_after_the_longest_matching_occurrence():
    #            0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 7, 2, 3, 4, 5, 6, 1, 2, 3]
    # Suffix [1, 2, 3] matches at 0..2 (3 tokens), [2, 3] alone at 5..6: both leave 4 tokens to
    # copy, so the longer match wins.
    assert lookup_continuation(tokens, 4) == Match([9, 7, 2, 3], 3)


def test_most_recent_occurrence_wins_ties():
    tokens = [5, 1, 5, 2, 5]
    assert lookup_continuation(tokens, 1) == Match([2], 1)


def test_draft_capped_by_k_and_by_what_follows():
    tokens = [4, 8, 9, 10, 11, 12, 13, 4]
    assert lookup_continuation(tokens, 3).tokens == [8, 9, 10]
    assert lookup_continuation(tokens, 10).tokens == [8, 9, 10, 11, 12, 13, 4]


def test_no_match_or_nothing_asked():
    assert lookup_continuation([1, 2, 3], 4) == Match([], 0)
    assert lookup_continuation([1, 2, 1], 0) == Match([], 0)
    assert lookup_continuation([7], 4) == Match([], 0)
    assert lookup_continuation([1, 2, 1], 4, min_ngram=2) == Match([], 0)


def test_a_repeating_run_drafts_the_whole_k():
    # The most recent occurrence of [..., 5, 5] is one token from the end; an earlier one has room.
    assert lookup_continuation([3, 5, 5, 5, 5, 5, 5], 4).tokens == [5, 5, 5, 5]


def test_match_length_is_compared_up_to_max_match():
    run = list(range(100, 100 + 40))
    tokens = run + [7] + run
    assert lookup_continuation(tokens, 4) == Match([7, 100, 101, 102], MAX_MATCH)


def test_index_finds_the_longest_keyed_recent_occurrence():
    index = SuffixIndex(max_tokens=1000)
    index.add([1, 2, 3, 40, 41, 42])  # [2, 3] -> 40 ... (a 3-token key match)
    index.add([9, 9, 1, 2, 3, 50, 51])  # more recent: the same 3-token key now points here
    assert index.lookup([0, 1, 2, 3], 2) == Match([50, 51], 3)
    long_context = [5, 6, 7, 8, 10, 11, 12, 13]
    index.add(long_context + [60, 61, 62])
    index.add([0, 11, 12, 13, 70])  # shares only the last 3 tokens with long_context
    # The 8-token key wins over the more recent 3-token occurrence.
    assert index.lookup(long_context, 3) == Match([60, 61, 62], 8)
    assert index.lookup([0, 11, 12, 13], 5) == Match([70], 4)
    assert index.lookup([99, 98, 97], 4) == Match([], 0)


def test_index_copies_from_the_earliest_occurrence_within_an_output():
    """A looping output holds its keys many times; the earliest occurrence has the most after it."""
    index = SuffixIndex(max_tokens=1000)
    index.add([1, 2, 3] + [7] * 12)
    assert index.lookup([5, 7, 7, 7], 4) == Match([7, 7, 7, 7], 3)
    index.add([8] + [7] * 5 + [9])  # a more recent output still wins over the earlier one
    assert index.lookup([5, 7, 7, 7], 4) == Match([7, 7, 9], 3)


def test_index_forgets_the_oldest_outputs_within_its_budget():
    index = SuffixIndex(max_tokens=20)
    index.add(list(range(10, 22)))  # 12 tokens
    index.add(list(range(30, 42)))  # 24 in all: the first goes
    assert index.tokens == 12
    assert index.lookup([10, 11, 12], 3) == Match([], 0)
    assert index.lookup([30, 31, 32], 3) == Match([33, 34, 35], 3)
    index.add(list(range(30, 34)) + [99])  # a newer occurrence of [30, 31, 32] survives eviction of the old one
    index.add(list(range(200, 212)))
    assert index.lookup([30, 31, 32], 2) == Match([33, 99], 3)


def step_of(tokens: list[int], prompt_len: int, k: int = 4, limit: int = 16, learns: bool = True) -> DraftStep:
    return DraftStep(DraftRequest(prompt_len, learns=learns), list(tokens), k, limit)


def close(drafter: NgramDrafter, tokens: list[int], prompt_len: int) -> None:
    drafter.open(DraftRequest(prompt_len)).close(tokens)


def test_drafter_learns_outputs_across_calls_and_grows_drafts_with_the_match():
    drafter = NgramDrafter()
    prompt = [3, 4, 5, 6, 7]
    output = list(range(100, 130))
    close(drafter, prompt + output, len(prompt))
    # A new request whose own tokens never saw the output: the index supplies it, and a match of
    # 5 tokens (the prompt) lets the draft grow past the schedule's k of 2.
    session = drafter.open(DraftRequest(6))
    assert session.propose(step_of([1] + prompt, 6, k=2)) == Draft(output[:5])
    # max_new_tokens is near: never more than the loop allows
    assert session.propose(step_of([1] + prompt, 6, k=2, limit=3)).tokens == output[:3]
    # A request that may not learn across calls (seeded sampling) sees only its own tokens.
    seeded = drafter.open(DraftRequest(6, learns=False))
    assert seeded.propose(step_of([1] + prompt, 6, k=2, learns=False)) == Draft([])


def test_indexed_output_keeps_some_prompt_context_and_prefers_the_longer_match():
    drafter = NgramDrafter()
    prompt = list(range(50, 50 + 3 * INDEX_CONTEXT))
    close(drafter, prompt + [7, 8, 9, 10], len(prompt))
    assert drafter.index.tokens == INDEX_CONTEXT + 4  # the rest of the prompt is not indexed
    # The request's own 1-token match (97 at its start) loses to the index's 8-token match.
    tokens = [97, 1, 1] + prompt[-8:]
    assert drafter.open(DraftRequest(len(tokens))).find(step_of(tokens, len(tokens))) == Match([7, 8, 9, 10], 8)
    blind = NgramDrafter(index_tokens=0).open(DraftRequest(len(tokens)))
    assert blind.find(step_of(tokens, len(tokens))) == Match([1, 1, 90, 91], 1)
