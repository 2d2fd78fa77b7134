"""Speculative decoding engine: token ids in, bursts of verified token ids out (no chat, no LangChain)."""

from .engine import BurstStream, Engine
from .types import Burst, GenerationRequest, GenerationResult, SamplingParams, SpeculativeStats

__all__ = [
    "Burst",
    "BurstStream",
    "Engine",
    "GenerationRequest",
    "GenerationResult",
    "SamplingParams",
    "SpeculativeStats",
]
