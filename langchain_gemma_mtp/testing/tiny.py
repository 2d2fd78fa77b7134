"""Tiny real Gemma 4 configs and builders: a target's text config and an MTP assistant that matches it."""

from __future__ import annotations

from typing import Any

import torch
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig, PreTrainedModel

VOCAB = 512
HIDDEN = 64
HEAD_DIM = 16
WINDOW = 8  # shorter than the test sequences, so sliding layers really slide
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
EOS = 1
MAX_POS = 256

# The config reads global_head_dim from its extra keyword arguments; it is no declared field.
_GLOBAL_HEAD_DIM: dict[str, Any] = {"global_head_dim": HEAD_DIM}


def shared_text_kwargs(vocab: int = VOCAB, hidden: int = HIDDEN) -> dict:
    """Geometry and special tokens every tiny text config (Gemma 3 or 4) has in common."""
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=len(LAYERS),
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        layer_types=list(LAYERS),
        sliding_window=WINDOW,
        max_position_embeddings=MAX_POS,
        initializer_range=0.2,  # wide logit gaps: fp32 argmax never sits on a near-tie
        eos_token_id=EOS,
        pad_token_id=0,
        bos_token_id=2,
    )


def gemma4_text_config(*, shared: bool, ple: bool, vocab: int = VOCAB, hidden: int = HIDDEN, **kw) -> Gemma4TextConfig:
    """A four-layer Gemma 4 text config; `shared`: KV sharing, `ple`: per-layer inputs."""
    return Gemma4TextConfig(
        **shared_text_kwargs(vocab, hidden),
        **_GLOBAL_HEAD_DIM,
        num_kv_shared_layers=2 if shared else 0,
        hidden_size_per_layer_input=8 if ple else 0,
        vocab_size_per_layer_input=vocab if ple else 0,
        final_logit_softcapping=30.0,
        **kw,
    )


def build_assistant(
    target: PreTrainedModel, *, ordered: bool, seed: int = 1, hidden: int = 32, layers: int = 2
) -> Gemma4AssistantForCausalLM:
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
        **_GLOBAL_HEAD_DIM,
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
        assert model.masked_embedding is not None  # built when use_ordered_embeddings is set
        model.masked_embedding.token_ordering.copy_(torch.randperm(tc.vocab_size))
    return model.eval()
