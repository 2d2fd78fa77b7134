"""Distill Gemma 4 MTP assistants (drafters) against any target the engine runs: `gemma-mtp distill`."""

from .architecture import (
    assistant_config,
    balanced_clusters,
    build_assistant,
    save_assistant,
)
from .objective import TeacherBatch, heldout_acceptance, teacher_batch, unrolled_loss
from .trainer import DistillOptions, DistillResult, distill, distill_assistant

__all__ = [
    "DistillOptions",
    "DistillResult",
    "TeacherBatch",
    "assistant_config",
    "balanced_clusters",
    "build_assistant",
    "distill",
    "distill_assistant",
    "heldout_acceptance",
    "save_assistant",
    "teacher_batch",
    "unrolled_loss",
]
