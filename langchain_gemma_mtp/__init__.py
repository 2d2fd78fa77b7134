"""Fast local Gemma 4 for LangChain: lossless speculative decoding with per-call draft lengths."""

__version__ = "0.1.0"

__all__ = ["__version__"]
