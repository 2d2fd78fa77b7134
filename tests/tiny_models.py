"""Tiny real Gemma models built from configs, for tests: targets of every kind and matching assistants."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    GenerationConfig,
)

VOCAB = 512
HIDDEN = 64
HEAD_DIM = 16
WINDOW = 8  # shorter than the test sequences, so sliding layers really slide
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
EOS = 1
MAX_POS = 256


def gemma4_text_config(*, shared: bool, ple: bool, vocab: int = VOCAB, hidden: int = HIDDEN, **kw) -> Gemma4TextConfig:
    return Gemma4TextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=len(LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        global_head_dim=HEAD_DIM,
        layer_types=list(LAYERS),
        sliding_window=WINDOW,
        num_kv_shared_layers=2 if shared else 0,
        hidden_size_per_layer_input=8 if ple else 0,
        vocab_size_per_layer_input=vocab if ple else 0,
        max_position_embeddings=MAX_POS,
        final_logit_softcapping=30.0,
        initializer_range=0.2,  # wide logit gaps: fp32 argmax never sits on a near-tie
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=2,
        **kw,
    )


def gemma3_text_config(vocab: int = VOCAB) -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=len(LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        layer_types=list(LAYERS),
        max_position_embeddings=MAX_POS,
        initializer_range=0.2,
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=2,
    )


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


def build_assistant(target, *, ordered: bool, seed: int = 1, hidden: int = 32, layers: int = 2):
    """A Gemma 4 assistant whose K/V geometry and rope match `target`."""
    torch.manual_seed(seed)
    tc = target.config.get_text_config()
    text = Gemma4TextConfig(
        vocab_size=tc.vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        global_head_dim=HEAD_DIM,
        layer_types=["sliding_attention", "full_attention"][:layers] if layers <= 2 else None,
        sliding_window=WINDOW,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(tc.rope_parameters),
        initializer_range=0.2,
    )
    config = Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=tc.hidden_size,
        use_ordered_embeddings=ordered,
        num_centroids=16,
        centroid_intermediate_top_k=4,
    )
    model = Gemma4AssistantForCausalLM(config)
    if ordered:
        model.masked_embedding.token_ordering.copy_(torch.randperm(tc.vocab_size))
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
