"""Fast local Gemma 4 for LangChain: lossless speculative decoding with per-call draft lengths."""

from .chat_models import ChatGemmaMTP
from .hints import DraftHint

__version__ = "0.1.0"

__all__ = ["ChatGemmaMTP", "DraftHint", "__version__"]
