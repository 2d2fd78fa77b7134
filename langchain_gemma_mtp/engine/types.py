"""Plain data of the engine: requests, bursts of verified tokens, speculative stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..draft_settings import check_draft_hint, check_num_draft_tokens
from ..errors import InvalidRequestError
from .processors import LogitsProcessing

if TYPE_CHECKING:
    from .constraint import Grammar

# Temperatures below this are greedy (as vLLM's _SAMPLING_EPS): logits divided by a smaller one
# overflow float32, and the distribution is a point mass on the argmax well before.
GREEDY_BELOW = 1e-5
SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes


@dataclass
class SamplingParams:
    """How the next token is chosen; temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass
class GenerationRequest:
    """One call's inputs, validated before any forward pass."""

    prompt_ids: list[int]
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    num_draft_tokens: int | None = None
    draft_hint: str | int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    processing: LogitsProcessing = field(default_factory=LogitsProcessing)
    constraint: Grammar | None = None  # the output must match it (engine/constraint.py)

    @property
    def learns(self) -> bool:
        """Whether this request may draw on what the engine learned from other calls (draft
        schedules, the n-gram index, the hybrid drafter's choice). A seeded sampled request may
        not: the same seed must give the same output whatever other requests ran. The one place
        for this rule."""
        return self.seed is None or self.sampling.greedy

    def validate(self, vocab_size: int, max_positions: int | None) -> None:
        """Raise InvalidRequestError naming the problem and the fix."""
        if not self.prompt_ids:
            raise InvalidRequestError("prompt_ids is empty: pass at least one token id (e.g. the BOS token).")
        bad = [t for t in self.prompt_ids if not isinstance(t, int) or t < 0 or t >= vocab_size]
        if bad:
            raise InvalidRequestError(
                f"prompt_ids holds {len(bad)} id(s) outside the vocabulary [0, {vocab_size}), e.g. {bad[:3]}: "
                "tokenize with this model's own tokenizer."
            )
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise InvalidRequestError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}.")
        if max_positions is not None and len(self.prompt_ids) + self.max_new_tokens > max_positions:
            raise InvalidRequestError(
                f"prompt ({len(self.prompt_ids)} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds the "
                f"model's context of {max_positions} tokens: shorten the prompt or lower max_new_tokens."
            )
        s = self.sampling
        if not s.temperature >= 0:  # NaN too
            raise InvalidRequestError(f"temperature must be >= 0, got {s.temperature}.")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed not in SEEDS):
            raise InvalidRequestError(f"seed must be an int in [-2**63, 2**64), got {self.seed!r}.")
        if not 0.0 < s.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {s.top_p}.")
        if not isinstance(s.top_k, int) or s.top_k < 0:
            raise InvalidRequestError(f"top_k must be an int >= 0 (0 disables it), got {s.top_k!r}.")
        if not 0.0 <= s.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1] (0 disables it), got {s.min_p}.")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                f"stop_token_ids holds id(s) outside the vocabulary [0, {vocab_size}), e.g. {bad[:3]}: use this model's token ids."
            )
        self.processing.validate(vocab_size, self.max_new_tokens)
        if self.constraint is not None:
            from .constraint import Grammar  # here: the constraint module imports this one

            if not isinstance(self.constraint, Grammar):
                raise InvalidRequestError(
                    f"constraint must be a Grammar (engine.constraint.compile_lark), got {type(self.constraint).__name__}."
                )
        if self.num_draft_tokens is not None:
            check_num_draft_tokens(self.num_draft_tokens)
        if self.draft_hint is not None:
            check_draft_hint(self.draft_hint)


@dataclass
class SpeculativeStats:
    """Counters of one request's speculative decoding (or aggregated over many)."""

    drafter: str = "none"
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (not prefilled)
    drafted: int = 0
    accepted: int = 0
    sibling_tokens: int = 0  # tokens verified beside the chain (greedy draft trees)
    target_forwards: int = 0
    steps: int = 0
    jump_forward_tokens: int = 0  # draft tokens a grammar forced (engine/constraint.py), in `drafted` too
    jump_forward_accepted: int = 0  # of those, kept (in `accepted` too)
    draft_lengths: list[int] = field(default_factory=list)
    verify_widths: list[int] = field(default_factory=list)  # rows per verify forward: pending token, chain, siblings
    # The engine's fitted step costs when the request ended (costs.CostModel.snapshot).
    costs: dict[str, float | int | bool] = field(default_factory=dict)
    drafted_at: list[int] = field(default_factory=list)  # per draft position: how often it was verified
    accepted_at: list[int] = field(default_factory=list)  # per draft position: how often it was accepted

    def record_step(self, drafted: int, accepted: int, sibling_tokens: int = 0) -> None:
        """One verify forward: a chain of `drafted` tokens, of which the first `accepted` positions
        were kept (the last may have been a sibling in the chain token's place), and `sibling_tokens`
        verified beside the chain."""
        self.steps += 1
        self.target_forwards += 1
        self.drafted += drafted
        self.sibling_tokens += sibling_tokens
        self.accepted += accepted
        self.draft_lengths.append(drafted)
        self.verify_widths.append(1 + drafted + sibling_tokens)
        while len(self.drafted_at) < drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(drafted):
            self.drafted_at[i] += 1
            if i < accepted:
                self.accepted_at[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification step (accepted drafts + the target's own token)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]


@dataclass
class Burst:
    """Tokens verified by one target forward pass, in order."""

    token_ids: list[int]
    drafted: int  # the draft chain's length
    accepted: int  # draft positions kept (the last may be a sibling kept in the chain token's place)
    finish_reason: str | None = None  # "stop" (a stop token) or "length" on the last burst
    sibling_tokens: int = 0  # tokens verified beside the chain (greedy draft trees)


@dataclass
class EngineCounters:
    """Running totals over every verification step an engine ran (cancelled requests included),
    named like vLLM's speculative-decoding metrics; only the owner thread writes them."""

    steps: int = 0
    drafts: int = 0  # steps that verified at least one draft token
    draft_tokens: int = 0
    accepted_tokens: int = 0
    sibling_tokens: int = 0
    generated_tokens: int = 0
    drafted_at: list[int] = field(default_factory=list)  # per draft position: drafts verified there
    accepted_at: list[int] = field(default_factory=list)  # per draft position: drafts accepted there

    def add(self, burst: Burst) -> None:
        self.steps += 1
        self.generated_tokens += len(burst.token_ids)
        if burst.drafted:
            self.drafts += 1
        self.draft_tokens += burst.drafted
        self.accepted_tokens += burst.accepted
        self.sibling_tokens += burst.sibling_tokens
        while len(self.drafted_at) < burst.drafted:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(burst.drafted):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < burst.accepted


@dataclass
class GenerationResult:
    """A finished request: new tokens only (a final stop token included, as transformers does)."""

    token_ids: list[int]
    finish_reason: str
    stats: SpeculativeStats
    prompt_tokens: int
