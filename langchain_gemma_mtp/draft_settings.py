"""Drafting settings every layer shares: the draft-length limit, hint and drafter names, MTP defaults.

Torch-free, so the command line, the LangChain class and the server read the same facts the engine
uses; help texts and docstrings name these constants instead of restating their values.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict, get_args

from .errors import InvalidRequestError

MAX_DRAFT_TOKENS = 16
"""Most draft tokens one verification step holds, whatever asked for them (an int hint,
num_draft_tokens, the adaptive schedule or a long n-gram match)."""

HintKind = Literal["code", "prose", "tool_call", "long_form"]
HINT_KINDS: tuple[str, ...] = get_args(HintKind)
DRAFT_HINT_NAMES: tuple[str, ...] = ("auto", *HINT_KINDS)
"""The named draft hints: "auto" (picked per request by `hints.detect_kind`) and the kinds."""

DrafterName = Literal["auto", "mtp", "hybrid", "draft_model", "ngram", "none"]
DRAFTER_NAMES: tuple[str, ...] = get_args(DrafterName)
MTP_DRAFTERS: tuple[str, ...] = ("mtp", "hybrid")
"""The drafters that draft with an MTP assistant, the only ones the `mtp_*` settings apply to."""

# Chosen on the distilled 270M drafter (docs/research-notes.md: "Stopping drafts early", "Draft trees").
DEFAULT_MTP_STOP_BELOW = 0.3
"""An MTP draft stops once the product of the drafter's own probabilities falls below this."""
DEFAULT_MTP_SIBLINGS = 3
"""Runners-up per draft depth that greedy requests verify beside an MTP draft, as a tree."""
MAX_MTP_SIBLINGS = 8
MTP_SIBLING_MIN_CHANCE = 0.03
"""A runner-up is verified only if the drafter's own chance that it is accepted (the chain before
it accepted, times its probability) is at least this: each is a row of the verify forward."""


def check_draft_hint(hint: Any) -> None:
    """Raise InvalidRequestError unless `hint` is a named hint or an int in [0, MAX_DRAFT_TOKENS]."""
    if isinstance(hint, bool) or not (hint in DRAFT_HINT_NAMES or isinstance(hint, int)):
        raise InvalidRequestError(f"unknown draft_hint {hint!r}: use 'auto', one of {HINT_KINDS}, or an int in [0, {MAX_DRAFT_TOKENS}].")
    if isinstance(hint, int) and not 0 <= hint <= MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"an int draft_hint must be in [0, {MAX_DRAFT_TOKENS}], got {hint}.")


def check_num_draft_tokens(n: Any) -> None:
    """Raise InvalidRequestError unless `n` is an int in [0, MAX_DRAFT_TOKENS]."""
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_DRAFT_TOKENS:
        raise InvalidRequestError(f"num_draft_tokens must be an int in [0, {MAX_DRAFT_TOKENS}], got {n!r}.")


def check_drafter_name(drafter: Any) -> None:
    """Raise InvalidRequestError unless `drafter` is one of DRAFTER_NAMES."""
    if drafter not in DRAFTER_NAMES:
        raise InvalidRequestError(f"unknown drafter {drafter!r}: use one of {DRAFTER_NAMES}.")


def check_mtp_siblings(value: Any) -> int:
    """`value` if it is a valid count of runners-up per draft depth, else a typed error naming the fix."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_MTP_SIBLINGS:
        raise InvalidRequestError(
            f"siblings must be an int in [0, {MAX_MTP_SIBLINGS}] (0: verify the chain alone; "
            f"default {DEFAULT_MTP_SIBLINGS}), got {value!r}."
        )
    return value


def check_mtp_stop_below(value: Any) -> float:
    """`value` if it is a valid early-stop threshold, else a typed error naming the fix."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InvalidRequestError(
            f"stop_below must be a number in [0, 1) (0: always draft k; default {DEFAULT_MTP_STOP_BELOW}), got {value!r}."
        )
    return float(value)


class MTPSettings(TypedDict, total=False):
    """The MTP settings a caller gave, by their `mtp_` names (a missing key: the default)."""

    mtp_stop_below: float
    mtp_siblings: int


def mtp_settings(stop_below: float | None, siblings: int | None) -> MTPSettings:
    """The MTP settings a caller gave (None: the default), checked, by their `mtp_` names."""
    given: MTPSettings = {}
    if stop_below is not None:
        given["mtp_stop_below"] = check_mtp_stop_below(stop_below)
    if siblings is not None:
        given["mtp_siblings"] = check_mtp_siblings(siblings)
    return given
