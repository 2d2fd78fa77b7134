"""Speculative decoding engine: token ids in, bursts of verified token ids out (no chat, no LangChain)."""

from .engine import Engine
from .openmp import release_thread_team
from .types import Burst, GenerationRequest, GenerationResult, SamplingParams, SpeculativeStats
from .worker import RequestHandle, on_short_lived_thread

__all__ = [
    "Burst",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "RequestHandle",
    "SamplingParams",
    "SpeculativeStats",
    "on_short_lived_thread",
    "release_thread_team",
]
