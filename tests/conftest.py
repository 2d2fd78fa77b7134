"""Shared fixtures: tiny real Gemma checkpoints saved to disk, and a memorizing target with a distilled drafter."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import EOS, SMALL_VOCAB, VOCAB, build_assistant, build_target, memorize, save

# The suite runs on pytest-xdist (pyproject's addopts): its workers share the cores, one torch
# thread per core each, since more threads than cores spin against each other (on 2 cores, 2 workers
# with 2 threads each ran about 2x slower than one process). A plain run (`-n 0`) keeps 2 threads.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, (os.cpu_count() or 2) // WORKERS) if WORKERS > 1 else 2)
# Loading defaults to bf16 on CPUs with native bf16; tests compare against plain greedy token for
# token, which only fp32 guarantees (test_engine_loading checks the default itself).
os.environ.setdefault("GEMMA_MTP_DTYPE", "float32")
transformers.utils.logging.disable_progress_bar()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most 4 (each builds the session's checkpoints and holds its own models)."""
    return max(1, min(os.cpu_count() or 1, 4))


TARGET_KINDS = ("shared_ple", "noshare", "conditional", "gemma3")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny targets of every kind; beside each `<kind>-assistant` (ordered embeddings) and
    `<kind>-plain-assistant` (full-vocab head)."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for kind in TARGET_KINDS:
        target = build_target(kind)
        paths[kind] = save(target, root / kind)
        save(build_assistant(target, ordered=True), root / f"{kind}-assistant")
        save(build_assistant(target, ordered=False), root / f"{kind}-plain-assistant")
    return paths


@pytest.fixture(scope="session")
def memorized_sequences() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[2] + torch.randint(3, VOCAB, (60,), generator=g).tolist() + [EOS] for _ in range(3)]


@pytest.fixture(scope="session")
def memorizing_target(memorized_sequences):
    """A tiny Gemma 4 target trained for seconds to reproduce three token transcripts (plumbing only)."""
    target = build_target("shared_ple", seed=3)
    loss = memorize(target, memorized_sequences, steps=240, lr=5e-3)
    assert loss < 0.1, f"the fixture failed to memorize its transcripts (loss {loss:.3f})"
    return target


@pytest.fixture(scope="module")
def small_target():
    """A tiny Gemma 4 target of SMALL_VOCAB tokens and an untrained assistant: exact marginals are cheap."""
    target = build_target("shared_ple", seed=5, vocab=SMALL_VOCAB)
    return target, build_assistant(target, ordered=False, seed=6)
