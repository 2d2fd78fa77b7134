"""Drafters behind one protocol: Gemma 4 MTP, a draft model, n-gram lookup, or none."""

from .base import DecodeState, Drafter, NoDrafter
from .draft_model import DraftModelDrafter
from .mtp import MTPDrafter
from .ngram import NgramDrafter, lookup_continuation

DRAFTER_NAMES = ("auto", "mtp", "draft_model", "ngram", "none")

__all__ = [
    "DRAFTER_NAMES",
    "DecodeState",
    "DraftModelDrafter",
    "Drafter",
    "MTPDrafter",
    "NgramDrafter",
    "NoDrafter",
    "lookup_continuation",
]
