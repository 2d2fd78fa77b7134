"""A Gemma4Assistant shaped for a given target: matching K/V geometry, the target's LM head, a clustered centroid head."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

from ..engine.loading import kv_source_layer, layer_attr
from ..engine.target import SHARED_HEAD_FLAG, SHARED_HEAD_KEYS, TargetModel, bind_shared_head


def assistant_config(
    target: TargetModel, *, layers: int, hidden: int | None, intermediate: int | None, centroids: int, centroid_top_k: int
) -> Gemma4AssistantConfig:
    """An assistant config that reads `target`'s K/V: its last layer is full attention, the others sliding.

    With `hidden` equal to the target's (the default), the assistant drafts through the target's own
    LM head, so a checkpoint stores no vocabulary-sized matrix (config flag SHARED_HEAD_FLAG).
    """
    tc = target.config
    hidden = hidden or tc.hidden_size
    types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
    src = {t: kv_source_layer(target, t) for t in set(types)}
    full = src["full_attention"]
    sliding = src.get("sliding_attention", full)
    # The config reads per_layer_config from its extra keyword arguments; it is no declared field.
    per_layer: dict[str, Any] = {
        "per_layer_config": {
            i: {"head_dim": layer_attr(tc, full, "head_dim"), "num_key_value_heads": layer_attr(tc, full, "num_key_value_heads")}
            for i, t in enumerate(types)
            if t == "full_attention"
        }
    }
    text = Gemma4TextConfig(
        vocab_size=tc.vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=layer_attr(tc, sliding, "num_key_value_heads"),
        head_dim=layer_attr(tc, sliding, "head_dim"),
        layer_types=types,
        sliding_window=getattr(tc, "sliding_window", None) or tc.max_position_embeddings,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        max_position_embeddings=tc.max_position_embeddings,
        rope_parameters={t: dict(p) for t, p in tc.rope_parameters.items()},
        rms_norm_eps=tc.rms_norm_eps,
        pad_token_id=getattr(tc, "pad_token_id", 0),
        **per_layer,
    )
    config = Gemma4AssistantConfig(
        text_config=text,
        backbone_hidden_size=tc.hidden_size,
        use_ordered_embeddings=bool(centroids),
        num_centroids=centroids or 2048,
        centroid_intermediate_top_k=min(centroid_top_k, centroids) if centroids else 32,
    )
    if hidden == tc.hidden_size:
        setattr(config, SHARED_HEAD_FLAG, True)
    return config


def build_assistant(target: TargetModel, config: Gemma4AssistantConfig, seed: int = 0) -> Gemma4AssistantForCausalLM:
    """A fresh assistant for `target`: head shared with (or projected from) the target's, centroids clustered."""
    torch.manual_seed(seed)
    assistant = Gemma4AssistantForCausalLM(config).to(target.device)
    match_attention_scale(assistant, target)
    head = target.lm_head.weight.detach()
    if getattr(config, SHARED_HEAD_FLAG, False):
        bind_shared_head(assistant, target)
    else:  # its own head starts as the target's, projected to the assistant's width
        q, _ = torch.linalg.qr(torch.randn(head.shape[1], assistant.hidden_size, device=head.device))
        assistant.lm_head.weight.data.copy_(head.float() @ q)
    if assistant.masked_embedding is not None:
        weight = assistant.lm_head.weight.detach().float()
        ordering, centers = balanced_clusters(weight, config.num_centroids, seed=seed)
        assistant.masked_embedding.token_ordering.copy_(ordering)
        assistant.masked_embedding.centroids.weight.data.copy_(centers)
    return assistant


def match_attention_scale(assistant: Gemma4AssistantForCausalLM, target: TargetModel) -> None:
    """Start each assistant layer's query norm at the scale the target's own queries meet its K with.

    Gemma 4 attention multiplies q.k by 1 (its K are normed for that); Gemma 3 trained its K for
    1/sqrt(query_pre_attn_scalar) (1/16 on the 270M). Left at 1, a drafter reading Gemma 3 K/V starts with
    attention logits an order of magnitude too sharp: the softmax saturates and its gradient
    vanishes (on the 270M it trained markedly slower without this start: docs/research-notes.md).
    """
    layers = target.decoder.layers
    for layer, layer_type in zip(assistant.model.layers, assistant.config.get_text_config().layer_types):
        theirs = layers[kv_source_layer(target, layer_type)].self_attn.scaling
        layer.self_attn.q_norm.weight.data.mul_(theirs / layer.self_attn.scaling)


def balanced_clusters(
    rows: torch.Tensor, clusters: int, *, seed: int = 0, iters: int = 10, sample: int = 65536, candidates: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split `rows` (V, H) into `clusters` equal groups by direction (spherical k-means on a sample,
    then a capacity-bounded assignment of every row); return (ordering, centers).

    ordering lists the row ids cluster by cluster, as Gemma4Assistant's `token_ordering` expects;
    centers are each cluster's mean row, so a centroid logit starts as its tokens' mean logit.
    """
    vocab = rows.shape[0]
    size = vocab // clusters
    unit = _unit(rows)
    g = torch.Generator(device="cpu").manual_seed(seed)
    pick = torch.randperm(vocab, generator=g)[: max(clusters, min(sample, vocab))].to(rows.device)
    data = unit[pick]
    centers = data[torch.randperm(data.shape[0], generator=g)[:clusters].to(rows.device)].clone()
    for _ in range(iters):
        assign = torch.cat([(part @ centers.T).argmax(-1) for part in data.split(8192)])
        sums = torch.zeros_like(centers).index_add_(0, assign, data)
        counts = torch.bincount(assign, minlength=clusters)
        centers = torch.where(counts[:, None] > 0, _unit(sums), centers)
    top_k = min(candidates, clusters)
    scores, choices = [], []
    for part in unit.split(16384):
        s, c = (part @ centers.T).topk(top_k, dim=-1)
        scores.append(s[:, 0])
        choices.append(c)
    best, choice = torch.cat(scores), torch.cat(choices).tolist()
    room = [size] * clusters
    members: list[list[int]] = [[] for _ in range(clusters)]
    leftovers = []
    for token in best.argsort(descending=True).tolist():  # most confident rows choose first
        for c in choice[token]:
            if room[c]:
                room[c] -= 1
                members[c].append(token)
                break
        else:
            leftovers.append(token)
    for c in range(clusters):
        while room[c]:
            members[c].append(leftovers.pop())
            room[c] -= 1
    ordering = torch.tensor([t for group in members for t in group], device=rows.device)
    centers = rows[ordering].view(clusters, size, -1).mean(1)
    return ordering, centers


def _stored(v: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floats in the save dtype; the token ordering as int32 (it loads back into its int64 buffer)."""
    if v.is_floating_point():
        return v.to(dtype) if dtype is not None else v
    return v.to(torch.int32) if v.dtype == torch.int64 else v


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def assistant_weights(assistant: Gemma4AssistantForCausalLM, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The assistant's state dict without a head it shares with the target; floats in `dtype` when given."""
    shared = getattr(assistant.config, SHARED_HEAD_FLAG, False)
    return {k: _stored(v, dtype) for k, v in assistant.state_dict().items() if not (shared and k in SHARED_HEAD_KEYS)}


def save_assistant(assistant: Gemma4AssistantForCausalLM, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """save_pretrained, leaving out a head shared with the target (the loader binds it back)."""
    out = Path(out_dir)
    assistant.save_pretrained(out, state_dict=assistant_weights(assistant, dtype))
    return out
