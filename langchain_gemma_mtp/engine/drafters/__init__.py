"""Drafters behind one protocol: Gemma 4 MTP, a draft model, n-gram lookup, hybrid, or none."""

from .base import DecodeState, Drafter, NoDrafter, StatelessDrafter
from .draft_model import DraftModelDrafter
from .hybrid import HybridDrafter
from .mtp import MTPDrafter
from .ngram import Match, NgramDrafter, SuffixIndex, lookup_continuation

__all__ = [
    "DecodeState",
    "DraftModelDrafter",
    "Drafter",
    "HybridDrafter",
    "Match",
    "MTPDrafter",
    "NgramDrafter",
    "NoDrafter",
    "StatelessDrafter",
    "SuffixIndex",
    "lookup_continuation",
]
