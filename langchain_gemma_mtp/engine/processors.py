"""Per-request logits processors (penalties, logit bias, min_tokens) applied to the target's logits at every verified row.

Speculative decoding stays exact only if each verified row is processed with the history it
would have had in plain decoding: the prompt, the accepted output, and the draft tokens on that
row's path (a sibling's path runs through its chain ancestors, then itself). `RequestProcessors`
keeps the committed history as counts on the device and applies the processors to a whole block
of rows at once: broadcast for the committed history, then a fix-up of the few (row, token)
entries that the row's own path changes.

Order and semantics follow vLLM (so a request means the same here and there): logit bias, then
min_tokens, then the repetition penalty (HF/vLLM: over prompt and output, a positive logit is
divided by it, a negative one multiplied), then frequency and presence penalties (OpenAI: over
generated tokens, `logit -= count * frequency + (count > 0) * presence`). Temperature, min_p,
top-k and top-p come after, in `verify.process_logits`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InvalidRequestError
from .tree import DraftTree

LOGIT_BIAS_RANGE = 100.0  # OpenAI's range; -100 bans a token in practice (Gemma's logits are softcapped to ±30)
PENALTY_RANGE = 2.0  # OpenAI's range of frequency and presence penalties


@dataclass(frozen=True)
class LogitsProcessing:
    """A request's history-dependent processors; the defaults change nothing."""

    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    min_tokens: int = 0

    @property
    def active(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.logit_bias or self.min_tokens)

    def validate(self, vocab_size: int, max_new_tokens: int) -> None:
        """Raise InvalidRequestError naming the bad field and its valid range."""
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -PENALTY_RANGE <= value <= PENALTY_RANGE:
                raise InvalidRequestError(f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}.")
        r = self.repetition_penalty
        if not _is_number(r) or not 0.0 < r <= 1e4:
            raise InvalidRequestError(f"repetition_penalty must be a number > 0 (1 disables it, > 1 discourages repeats), got {r!r}.")
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidRequestError(f"logit_bias must map token ids to biases, got {type(self.logit_bias).__name__}.")
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
                raise InvalidRequestError(
                    f"logit_bias key {token!r} is not a token id of this model's vocabulary [0, {vocab_size}): "
                    "use ids from this model's own tokenizer."
                )
            if not _is_number(bias) or not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise InvalidRequestError(f"logit_bias[{token}] must be a number in [-100, 100] (-100 bans the token), got {bias!r}.")
        m = self.min_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            raise InvalidRequestError(f"min_tokens must be an int >= 0, got {m!r}.")
        if m > max_new_tokens:
            raise InvalidRequestError(f"min_tokens ({m}) is over max_new_tokens ({max_new_tokens}): lower min_tokens or allow more tokens.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class RequestProcessors:
    """One request's processors with its committed history (prompt + accepted output) as counts."""

    def __init__(self, processing: LogitsProcessing, prompt: Sequence[int], end_ids: frozenset[int], vocab_size: int, device: torch.device):
        self.p = processing
        self.prompt_len = len(prompt)
        self.generated = 0
        self.counts = torch.zeros(vocab_size, device=device)  # occurrences in the output
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # in prompt or output
        self.seen[torch.tensor(list(prompt), device=device)] = True
        self.bias = None
        if processing.logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            ids = torch.tensor(list(processing.logit_bias), device=device)
            self.bias[ids] = torch.tensor(list(processing.logit_bias.values()), dtype=torch.float32, device=device)
        self.end_ids = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)

    def _commit(self, tokens: Sequence[int]) -> None:
        ids = torch.tensor(list(tokens), device=self.counts.device)
        self.counts.index_add_(0, ids, torch.ones(len(tokens), device=ids.device))
        self.seen[ids] = True
        self.generated += len(tokens)

    def apply(self, logits: torch.Tensor, committed: Sequence[int], paths: Sequence[Sequence[int]]) -> torch.Tensor:
        """float32 logits of each row processed with its history: `committed` (prompt + accepted
        output, the pending token included) plus `paths[row]` (the fed tokens after it on that row's path)."""
        new = committed[self.prompt_len + self.generated :]
        if new:
            self._commit(new)
        raw = logits.float()
        out = raw + self.bias if self.bias is not None else raw.clone()
        p = self.p
        if p.min_tokens and self.end_ids.numel():
            short = torch.tensor([self.generated + len(path) < p.min_tokens for path in paths], device=out.device)
            if short.any():
                out[short.nonzero()[:, :1], self.end_ids] = float("-inf")
        penalized = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
        if not penalized:
            return out
        biased = out.clone()
        out = self._penalize(out, self.counts, self.seen)
        # Tokens on a row's own path have more occurrences in that row's history than committed.
        rows, tokens, extra = [], [], []
        for row, path in enumerate(paths):
            for token in set(path):
                rows.append(row)
                tokens.append(token)
                extra.append(path.count(token))
        if rows:
            r = torch.tensor(rows, device=out.device)
            t = torch.tensor(tokens, device=out.device)
            counts = self.counts[t] + torch.tensor(extra, dtype=torch.float32, device=out.device)
            out[r, t] = self._penalize(biased[r, t], counts, torch.ones_like(counts, dtype=torch.bool))
        return out

    def _penalize(self, scores: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """Repetition, then frequency and presence penalties, elementwise (counts and seen broadcast)."""
        p = self.p
        if p.repetition_penalty != 1.0:
            scaled = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
            scores = torch.where(seen, scaled, scores)
        if p.frequency_penalty:
            scores = scores - p.frequency_penalty * counts
        if p.presence_penalty:
            scores = scores - p.presence_penalty * (counts > 0).float()
        return scores


def row_paths(draft: Sequence[int], tree: DraftTree | None = None) -> list[list[int]]:
    """Per verified row, the fed tokens after the pending one on its path: [] for the pending
    token's row, draft[:i] for chain row i, and chain ancestors + itself for a sibling."""
    if tree is None:
        return [list(draft[:i]) for i in range(len(draft) + 1)]
    block, parents = tree.tokens(-1), tree.parents()
    paths: list[list[int]] = [[]]
    for slot in range(1, tree.width):
        paths.append([*paths[parents[slot]], block[slot]])
    return paths
