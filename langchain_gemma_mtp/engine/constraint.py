"""Grammar-constrained decoding (llguidance) inside the speculative loop: token masks at every
verified row, drafts cut where the grammar forbids, jump-forward tokens, rollback of rejected drafts.

The engine knows token ids and a compiled `Grammar`, not chat: the runtime builds the grammar
text (formats/grammar.py) and compiles it here for its tokenizer. Exactness for the constrained
distribution follows the same rule as `processors.py`: each verified row is masked by the grammar
state after that row's own path (committed output, then the draft tokens before it; a tree
sibling's path runs through its chain ancestors), so verification compares the draft with what
constrained plain decoding would have chosen there.

- A draft token the grammar forbids could never be accepted by the masked target. A greedy or
  point-mass draft is cut before it (the target's own token there is the same either way); a draft
  sampled from the drafter's distribution q keeps it as its last token, so that its certain
  rejection draws from norm(max(0, p - q)) as Leviathan et al. require (cutting would draw from p
  instead and bias the output by q's forbidden mass).
- Jump-forward: where the grammar forces the next bytes (a key, punctuation, a closing marker),
  llguidance's `compute_ff_tokens` tokenizes them; they are appended to the draft as point-mass
  draft tokens (probability 1), verified by the masked target like any draft, and cost no extra
  forward. Where the forced text has one tokenization the mask allows nothing else and they are
  accepted with certainty.
- Once the grammar reaches its end (nothing more can follow) the output stops as at a stop token;
  where it may end, the request's stop tokens are allowed.
- The budget: where the grammar may end and the tokens left (`max_new_tokens` less the row's
  position) are no more than 1.5x the longest stretch the output has taken between two points
  where it could end (a whole tool call, say), only the stop tokens are allowed, so the answer ends
  complete instead of starting another call that `max_new_tokens` would cut. The stretch that
  opens the answer counts (with the prefix the prompt wrote) only when the answer could not end
  at its start: then it is a forced call; an optional opening stretch may be a thought, which
  never comes again. Both the room and the stretches are functions of the row's path, so masks
  stay exact for speculation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from ..draft_settings import MAX_DRAFT_TOKENS
from ..errors import GrammarError
from .drafters import Draft
from .types import GenerationRequest, SpeculativeStats


@dataclass(frozen=True)
class Grammar:
    """A grammar compiled for one tokenizer: what `GenerationRequest.constraint` holds.

    `prefix`: tokens of the grammar's text that the prompt already ends with (a forced opening
    such as `<|tool_call>call:NAME{` or JSON's `{`); the output continues after them.
    `jump_forward=False` verifies only what the drafter proposed (for measuring what jump-forward
    adds); the output is the same either way."""

    tokenizer: LLTokenizer
    text: str  # llguidance's serialized grammar
    prefix: tuple[int, ...] = ()
    jump_forward: bool = True

    def matcher(self) -> LLMatcher:
        """A matcher in the state after `prefix`."""
        matcher = LLMatcher(self.tokenizer, self.text, log_level=0)
        matcher.consume_tokens(list(self.prefix))
        return matcher


_TOKENIZERS: dict[int, tuple[Any, LLTokenizer]] = {}
_TOKENIZERS_LOCK = Lock()


def grammar_tokenizer(hf_tokenizer: Any) -> LLTokenizer:
    """llguidance's view of a fast HF tokenizer, built once per tokenizer object (it reads the
    whole vocabulary). Its EOS marks where the grammar may end; the request's stop ids stand for it."""
    with _TOKENIZERS_LOCK:
        held = _TOKENIZERS.get(id(hf_tokenizer))
        if held is None or held[0] is not hf_tokenizer:
            held = (hf_tokenizer, from_tokenizer(hf_tokenizer))
            _TOKENIZERS[id(hf_tokenizer)] = held
        return held[1]


def compile_lark(lark: str, tokenizer: LLTokenizer, what: str, prefix: Sequence[int] = ()) -> Grammar:
    """Compile a Lark grammar (with `%json{...}` and special-token parts) for `tokenizer`, its
    output already begun by the `prefix` tokens; raise GrammarError naming `what` (e.g. "the tool
    schemas") when llguidance refuses it or the vocabulary cannot write its start. Cheap next to
    any forward pass."""
    grammar = LLMatcher.grammar_from_lark(lark)
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if failed:
        raise GrammarError(f"{what} cannot be compiled to a grammar: {messages[0]}. Simplify that part of the schema.")
    matcher = LLMatcher(tokenizer, grammar, log_level=0)
    if matcher.try_consume_tokens(list(prefix)) != len(prefix):
        raise GrammarError(f"{what}: the forced opening {tokenizer.decode_str(list(prefix))!r} does not start the grammar.")
    if matcher.is_error():
        raise GrammarError(f"{what} cannot be compiled to a grammar: {matcher.get_error()}. Simplify that part of the schema.")
    mask = allocate_token_bitmask(1, tokenizer.vocab_size)
    fill_next_token_bitmask(matcher, mask)
    if not mask.any() and not matcher.is_accepting():
        raise GrammarError(f"{what}: no token of this model's vocabulary can start it; use text the tokenizer can write.")
    return Grammar(tokenizer, grammar, tuple(prefix))


class NoConstraint:
    """An unconstrained request: every hook hands its input back unchanged."""

    def mask(self, logits: torch.Tensor, paths: Sequence[Sequence[int]]) -> torch.Tensor:
        return logits

    def draft(self, draft: Draft, room: int) -> Draft:
        return draft

    def commit(self, new: list[int], finish: str | None) -> tuple[list[int], str | None]:
        return new, finish


class RequestConstraint:
    """One request's grammar state; the matcher holds the committed output (the pending token
    included) between steps, and is walked forward and rolled back to probe drafts.

    `_ends` holds, for the start and after each token the matcher holds, (the output length where
    the answer could last end, or None before the first such point when the opening stretch does
    not count; the longest stretch between two such points): the budget rule's view of the path."""

    def __init__(self, grammar: Grammar, stop_ids: frozenset[int], stats: SpeculativeStats, max_new_tokens: int) -> None:
        self.grammar = grammar
        self.matcher = grammar.matcher()
        self.stop_ids = stop_ids
        self.stats = stats
        self.budget = max_new_tokens
        self.can_stop = any(t < grammar.tokenizer.vocab_size for t in stop_ids)  # else the budget cannot end it early
        self.vocab = grammar.tokenizer.vocab_size
        self.eos = set(grammar.tokenizer.eos_tokens)
        self._jump: tuple[int, int] | None = None  # the last draft's jump-forward tokens: (start, count)
        self._ends: list[tuple[int | None, int]] = [(None if self.matcher.is_accepting() else -len(grammar.prefix), 0)]

    # -- the path and its budget ----------------------------------------------------------------

    def _walk(self, token: int) -> bool:
        """Consume one token into the matcher (False, nothing changed, if the grammar forbids it)."""
        if self.matcher.try_consume_tokens([token]) != 1:
            return False
        last, longest = self._ends[-1]
        here = len(self._ends)  # output tokens held once this one is
        if self.matcher.is_accepting():
            if last is not None:
                longest = max(longest, here - last)
            last = here
        self._ends.append((last, longest))
        return True

    def _back(self, count: int) -> None:
        if count:
            self.matcher.rollback(count)
            del self._ends[-count:]

    def _must_end(self) -> bool:
        """Whether the answer must end here: it may, and the tokens left (this one included) could
        not hold another stretch half again as long as the longest so far, and a stop token after
        it. The half is slack: a next call may be longer than the last (optional keys, longer
        values), and the property test found such calls cut with no slack."""
        longest = self._ends[-1][1]
        room = self.budget - (len(self._ends) - 1)
        return self.can_stop and 0 < longest + longest // 2 >= room and self.matcher.is_accepting()

    # -- masks ----------------------------------------------------------------------------------

    def mask(self, logits: torch.Tensor, paths: Sequence[Sequence[int]]) -> torch.Tensor:
        """Rows of logits with what the grammar forbids after each row's path set to -inf. A row
        whose path the grammar cannot follow (past a forbidden draft token, or past the grammar's
        end) is left as it is: it can never be the one a token is taken from."""
        bits = allocate_token_bitmask(len(paths), self.vocab)
        masked = []
        walked: list[int] = []
        for row, path in enumerate(paths):
            same = 0
            while same < min(len(walked), len(path)) and walked[same] == path[same]:
                same += 1
            self._back(len(walked) - same)
            del walked[same:]
            for token in path[same:]:
                if not self._walk(token):
                    break
                walked.append(token)
            if len(walked) < len(path):
                continue
            fill_next_token_bitmask(self.matcher, bits, row)
            if self._end_tokens(bits, row):
                masked.append(row)
        self._back(len(walked))
        if not masked:
            return logits
        allowed = self._unpack(bits, masked, logits.shape[-1])
        return logits.masked_fill(~torch.from_numpy(allowed).to(logits.device), float("-inf"))

    def _end_tokens(self, bits: np.ndarray, row: int) -> bool:
        """Put the request's stop tokens where the grammar allows its EOS, and nothing else where
        the budget says the answer must end (module docstring); False when the row then allows
        nothing (past the grammar's end with no stop token to take)."""
        words = bits[row].view(np.uint32)
        may_end = any(words[t >> 5] >> (t & 31) & 1 for t in self.eos)
        for t in self.eos:
            words[t >> 5] &= ~np.uint32(1 << (t & 31))
        if may_end:
            if self._must_end():
                words[:] = 0
            for t in self.stop_ids:
                if t < self.vocab:
                    words[t >> 5] |= np.uint32(1 << (t & 31))
        return bool(words.any())

    @staticmethod
    def _unpack(bits: np.ndarray, masked: list[int], vocab: int) -> np.ndarray:
        """(rows, vocab) bool from llguidance's int32 bitmask: masked rows as the bits say (ids past
        the tokenizer's banned), the other rows all allowed. numpy, single-threaded: a few
        microseconds where torch's indexing on a busy machine can take milliseconds."""
        unpacked = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").astype(bool)
        allowed = np.ones((len(bits), vocab), dtype=bool)
        n = min(vocab, unpacked.shape[1])
        allowed[masked, :n] = unpacked[masked, :n]
        allowed[masked, n:] = False
        return allowed

    # -- drafts ---------------------------------------------------------------------------------

    def draft(self, draft: Draft, room: int) -> Draft:
        """The draft cut at the first token the grammar forbids (see the module docstring), tree
        siblings the grammar forbids dropped, and jump-forward tokens appended (at most `room`
        tokens in all, and no more than a drafter may draft)."""
        tokens, alternatives = draft.tokens, draft.alternatives
        kept_alts: list[list[int]] = []
        valid = 0
        ended = False
        for i, token in enumerate(tokens):
            must_end = self._must_end()
            if i < len(alternatives):
                kept_alts.append([] if must_end else [s for s in alternatives[i] if self.matcher.validate_tokens([s]) == 1])
            if token in self.stop_ids and self.matcher.is_accepting():
                valid, ended = i + 1, True  # the output ends here: nothing after it counts
                break
            if must_end or not self._walk(token):
                break
            valid = i + 1
        consumed = valid - ended
        keep = valid
        if valid < len(tokens) and not ended and draft.probs is not None:
            keep = valid + 1  # sampled from q: its certain rejection must draw from the residual
        jump: list[int] = []
        if self.grammar.jump_forward and keep == valid and not ended and not self.matcher.is_stopped():
            jump = self.matcher.compute_ff_tokens()[: max(0, min(room, MAX_DRAFT_TOKENS) - keep)]
        self._back(consumed)
        self._jump = (keep, len(jump)) if jump else None
        self.stats.jump_forward_tokens += len(jump)
        if keep == len(tokens) and not jump and len(kept_alts) == len(alternatives) and kept_alts == list(alternatives):
            return draft
        probs = draft.probs
        if probs is not None:
            probs = probs[:keep]
            if jump:
                certain = torch.zeros(len(jump), probs.shape[-1], dtype=probs.dtype, device=probs.device)
                certain[torch.arange(len(jump)), torch.tensor(jump)] = 1.0
                probs = torch.cat([probs, certain])
        alts = [*kept_alts[:keep], *([[]] * (keep + len(jump) - len(kept_alts[:keep])))] if alternatives else []
        return Draft([*tokens[:keep], *jump], probs, alts)

    # -- commit ---------------------------------------------------------------------------------

    def commit(self, new: list[int], finish: str | None) -> tuple[list[int], str | None]:
        """Advance the grammar over a step's new tokens; cut them where the grammar ends (the
        request then stops as at a stop token)."""
        if self._jump is not None:  # drafts kept = the step's tokens but the target's own last one
            start, count = self._jump
            self.stats.jump_forward_accepted += min(count, max(0, len(new) - 1 - start))
            self._jump = None
        for i, token in enumerate(new):
            if token in self.stop_ids:
                break
            if not self._walk(token):
                raise RuntimeError(f"token {token} was verified against the grammar but it refuses it: {self.matcher.get_error()}")
            if self.matcher.is_stopped():
                return new[: i + 1], "stop"
        return new, finish


def open_constraint(request: GenerationRequest, stats: SpeculativeStats) -> RequestConstraint | NoConstraint:
    """The request's constraint hooks: a grammar's, or ones that change nothing."""
    if request.constraint is None:
        return NoConstraint()
    return RequestConstraint(request.constraint, request.stop_token_ids, stats, request.max_new_tokens)
