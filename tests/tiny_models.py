"""Tiny real Gemma models built from configs, for tests: targets of every kind and matching assistants."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    GenerationConfig,
)

# The Gemma 4 builders live in the package, shared with the examples' offline demos.
from langchain_gemma_mtp.testing.tiny import (  # noqa: F401 (re-exported for the tests)
    EOS,
    HEAD_DIM,
    HIDDEN,
    LAYERS,
    MAX_POS,
    VOCAB,
    WINDOW,
    build_assistant,
    gemma4_text_config,
    shared_text_kwargs,
)

SMALL_VOCAB = 16  # small enough for exact sampling marginals over every prefix (the statistical tests)


def gemma3_text_config(vocab: int = VOCAB) -> Gemma3TextConfig:
    return Gemma3TextConfig(**shared_text_kwargs(vocab))


def build_target(kind: str, seed: int = 0, vocab: int = VOCAB, hidden: int = HIDDEN):
    """kind: 'shared_ple' (kv sharing with per-layer inputs), 'noshare', 'conditional' (the
    Gemma4ForConditionalGeneration class real checkpoints use) or 'gemma3'."""
    torch.manual_seed(seed)
    if kind == "gemma3":
        model = Gemma3ForCausalLM(gemma3_text_config(vocab))
    elif kind == "conditional":
        text = gemma4_text_config(shared=True, ple=True, vocab=vocab, hidden=hidden)
        model = Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=None, audio_config=None))
    else:
        model = Gemma4ForCausalLM(gemma4_text_config(shared=kind == "shared_ple", ple=kind == "shared_ple", vocab=vocab, hidden=hidden))
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=0, bos_token_id=2)
    return model.eval()


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def memorize(model, sequences: list[list[int]], steps: int = 150, lr: float = 3e-3) -> float:
    """Train `model` to reproduce `sequences` (next-token loss); return the final loss.

    A plumbing fixture: the model learns these transcripts by heart, nothing more.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    data = [torch.tensor([s]) for s in sequences]
    loss = torch.tensor(0.0)
    for step in range(steps):
        ids = data[step % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()
