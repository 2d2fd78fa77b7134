"""Drafters behind one contract: Gemma 4 MTP, a draft model, n-gram lookup, hybrid, or none."""

from .base import NO_DRAFT, Draft, DraftAsk, Drafter, DraftRequest, DraftSession, DraftStep, NoDrafter, StatelessDrafter, propose_all
from .draft_model import DraftModelDrafter
from .hybrid import HybridDrafter
from .mtp import MTPDrafter
from .ngram import Match, NgramDrafter, SuffixIndex, lookup_continuation

__all__ = [
    "NO_DRAFT",
    "Draft",
    "DraftAsk",
    "DraftModelDrafter",
    "DraftRequest",
    "DraftSession",
    "DraftStep",
    "Drafter",
    "HybridDrafter",
    "MTPDrafter",
    "Match",
    "NgramDrafter",
    "NoDrafter",
    "StatelessDrafter",
    "SuffixIndex",
    "lookup_continuation",
    "propose_all",
]
