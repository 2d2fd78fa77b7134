"""Memorizing tiny models for plumbing checks: the tests' fixtures and the examples' --offline-demo.

Nothing here downloads anything. A tiny real Gemma 4 is trained for seconds to reproduce fixed
chat transcripts by heart (`memorizing_chat_model`), so agent loops, tool calls and streaming run
end to end through the real engine without a hub. Such a model shows that the plumbing works; it
says nothing about model quality.
"""

from .memorizing import MODEL_NAME, TOKENIZER_DIR, build_chat_target, memorizing_chat_model, training_sequences
from .transcripts import TURN_END, Transcript, call_text, structured_options, tool_loop, tool_options

__all__ = [
    "MODEL_NAME",
    "TOKENIZER_DIR",
    "TURN_END",
    "Transcript",
    "build_chat_target",
    "call_text",
    "memorizing_chat_model",
    "structured_options",
    "tool_loop",
    "tool_options",
    "training_sequences",
]
