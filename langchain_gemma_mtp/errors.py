"""Typed errors of langchain-gemma-mtp: each names the problem and the fix."""

from __future__ import annotations


class GemmaMTPError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(GemmaMTPError, ValueError):
    """A generation request is malformed; raised before any forward pass."""


class ModelNotFoundError(GemmaMTPError, FileNotFoundError):
    """A model or drafter checkpoint could not be found locally or on the hub."""


class IncompatibleDrafterError(GemmaMTPError, ValueError):
    """The drafter cannot serve this target (vocabulary, hidden size, heads or rope differ)."""


class ModelLoadError(GemmaMTPError, RuntimeError):
    """A checkpoint was found but could not be loaded correctly."""


class ContextLengthError(InvalidRequestError):
    """The prompt does not fit in the model's context window."""


class UnsupportedContentError(InvalidRequestError):
    """A message holds content this model path cannot read (images, audio, files on a text-only model)."""


class ToolSchemaError(InvalidRequestError):
    """A tool definition cannot be used: not JSON-serializable, or without a name."""


class DistillError(GemmaMTPError, ValueError):
    """Distillation options or data cannot make a drafter for this target; raised before training."""
