"""The distillation objective: the target's teacher signals, unrolled draft steps, loss and held-out acceptance."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers import Gemma4AssistantForCausalLM
from transformers.models.gemma4_assistant.modeling_gemma4_assistant import Gemma4AssistantMaskedEmbedder

from ..engine.cache import layer_kv
from ..engine.loading import kv_source_layer
from ..engine.target import TargetModel

# Above this vocabulary size the token loss is a sampled softmax (the target's top candidates plus
# random negatives): full logits of a 262k vocabulary at every position and step dominate training.
FULL_SOFTMAX_MAX_VOCAB = 32768

K = TypeVar("K", bound=Hashable)


@dataclass
class TeacherBatch:
    """What the target shows the assistant for one sequence, all positions at once."""

    tokens: torch.Tensor  # (T,)
    hidden: torch.Tensor  # (T, H) target final hidden states
    labels: torch.Tensor  # (T,) the target's own greedy prediction after each position (-1: none)
    shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # full-length K/V per layer type
    top_ids: torch.Tensor | None = None  # (T, M) the target's top-M tokens, labels first (sampled softmax)
    # (T, heads, head_dim) normed, pre-rotary queries of the target layer each drafter layer type reads
    queries: dict[str, torch.Tensor] | None = None


@contextlib.contextmanager
def captured_queries(attentions: Mapping[K, torch.nn.Module]) -> Iterator[dict[K, list[torch.Tensor]]]:
    """While open, every forward of each attention module appends its normed, pre-rotary queries
    ((B, T, heads, head_dim), in graph) under its key: q_proj's output through the module's own q_norm,
    the same in Gemma 3 and Gemma 4 whichever axis order their attention code uses after."""
    got: dict[K, list[torch.Tensor]] = {name: [] for name in attentions}
    hooks = []
    for name, attn in attentions.items():

        def hook(module, inputs, out, name=name, attn=attn):
            got[name].append(attn.q_norm(out.view(*out.shape[:-1], -1, attn.head_dim)))

        hooks.append(attn.get_submodule("q_proj").register_forward_hook(hook))
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def teacher_batch(
    target: TargetModel, token_ids: Sequence[int], top_m: int = 0, greedy_from: int | None = None, query_types: Sequence[str] = ()
) -> TeacherBatch:
    """Run the target once over `token_ids`; keep what the drafter reads and learns from.

    When tokens from `greedy_from` on are the target's own greedy continuation, they are the labels
    (the prompt before it gets none, label -1) and the vocabulary-sized head is never computed.
    `query_types` also keeps the queries of the target layers those drafter layer types read.
    """
    cache = target.new_cache()
    sources = {t: target.decoder.layers[kv_source_layer(target, t)].self_attn for t in query_types}
    with captured_queries(sources) as got:
        fwd = target.forward(list(token_ids), cache)
    queries = {t: q[0][0].to(torch.bfloat16) for t, q in got.items()} or None  # bf16: they only steer a cosine
    kv = fwd.shared_kv
    if kv is None:  # Gemma 3: the same tensors sit in the cache, full length before any crop
        kv = {t: layer_kv(cache, i) for t, i in target.kv_layers.items()}
    kv = {t: (k.float(), v.float()) for t, (k, v) in kv.items()}  # the assistant trains in fp32
    tokens = torch.tensor(list(token_ids), device=target.device)
    top_ids = None
    if greedy_from is not None:
        labels = torch.full_like(tokens, -1)
        start = max(greedy_from - 1, 0)
        labels[start:-1] = tokens[start + 1 :]
    else:
        logits = target.logits(fwd.hidden)
        labels = logits.argmax(-1)
        if top_m:
            top_ids = logits.topk(top_m, dim=-1).indices
            top_ids[:, 0] = labels  # equal but for exact ties; the loss reads column 0 as the label
    return TeacherBatch(tokens, fwd.hidden.float(), labels, kv, top_ids, queries)


def _draft_masks(length: int, window: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Query p (the pending token's position) sees the target's K/V strictly before p; sliding
    layers only the last window-1 of them, as the cache holds after a crop."""
    q = torch.arange(length, device=device)[:, None]
    kv = torch.arange(length, device=device)[None, :]
    full = kv < q
    sliding = full & (kv > q - window)
    # Position 0 has nothing to see; let it see itself so softmax stays finite (its loss is dropped).
    full[0, 0] = sliding[0, 0] = True
    return {"full_attention": full[None, None], "sliding_attention": sliding[None, None]}


def unrolled_states(
    assistant: Gemma4AssistantForCausalLM, target: TargetModel, batch: TeacherBatch, draft_steps: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (j, states) for k unrolled draft steps from every position at once, teacher-forced.

    Step j (0-based) from pending position p feeds token x_{p+j} with the previous step's state
    (the target's h_{p-1} for j=0), exactly as MTPDrafter does at inference; row p of `states`
    (the assistant's normed last hidden state, rows 1..T-j-1 meaningful) predicts labels[p+j].
    """
    T = batch.tokens.shape[0]
    device = batch.tokens.device
    window = getattr(assistant.config.get_text_config(), "sliding_window", T) or T
    masks = _draft_masks(T, window, device)
    positions = torch.arange(T, device=device)[None]
    h = torch.cat([batch.hidden[:1], batch.hidden[:-1]])[None]  # h_{p-1}; row 0 is a placeholder
    for j in range(draft_steps):
        if T - j <= 1:
            return
        tok = torch.cat([batch.tokens[j:], batch.tokens.new_zeros(j)])[None]
        x = assistant.pre_projection(torch.cat([target.embed(tok).to(h.dtype), h], dim=-1))
        out = assistant.model(
            inputs_embeds=x,
            attention_mask=masks,
            position_ids=positions,
            shared_kv_states=batch.shared_kv,
            use_cache=False,
            logits_to_keep=None,
        )
        last = out.last_hidden_state
        yield j, last[0]
        h = assistant.post_projection(last)


def _token_loss(
    states: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, cand: torch.Tensor | None, negatives: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy against `labels`: over the full vocabulary, or (large vocabularies) over each
    row's candidates `cand` (label in column 0) and random negatives shared by all rows."""
    if cand is None or negatives is None:  # the caller gives both or neither
        return F.cross_entropy(states @ weight.to(states.dtype).T, labels)
    # Gather rows before the dtype cast: casting a 262k-row head every step would dominate training.
    logits = torch.einsum("nh,nmh->nm", states, weight[cand].to(states.dtype))
    logits[:, 1:] = logits[:, 1:].masked_fill(cand[:, 1:] == labels[:, None], float("-inf"))
    neg = (states @ weight[negatives].to(states.dtype).T).masked_fill(negatives[None] == labels[:, None], float("-inf"))
    return F.cross_entropy(torch.cat([logits, neg], dim=-1), torch.zeros_like(labels))


def unrolled_loss(
    assistant: Gemma4AssistantForCausalLM,
    target: TargetModel,
    batch: TeacherBatch,
    draft_steps: int,
    negatives: torch.Tensor | None = None,
    query_weight: float = 0.0,
) -> torch.Tensor:
    """Mean over k unrolled draft steps of the cross-entropy against the target's greedy predictions.

    With `negatives` (large vocabularies) the softmax is sampled: the target's top tokens when the
    batch has them, else the label's cluster; with a centroid head the centroid logits also learn to
    rank the label's cluster first, since drafting only scores the tokens of the top clusters.
    With `query_weight` (and a batch with the target's queries), each drafter layer's queries for
    the token it is fed also learn the direction of the target's own queries for that token in the
    layer whose K/V it reads (1 - cosine per head): the target forms its copying queries only
    after its whole stack, and the token loss alone does not teach a drafter to rebuild them.
    """
    weight = assistant.lm_head.weight
    embedder = assistant.masked_embedding
    cluster_of = token_clusters(embedder.token_ordering, embedder.num_centroids) if embedder is not None else None
    layer_types = assistant.config.get_text_config().layer_types
    matched = dict(enumerate(layer.self_attn for layer in assistant.model.layers)) if query_weight and batch.queries is not None else {}
    queries = batch.queries or {}  # read only when `matched` is not empty
    losses = []
    with captured_queries(matched) as got:
        for j, states in unrolled_states(assistant, target, batch, draft_steps):
            losses.extend(_step_losses(j, states, batch, weight, embedder, cluster_of, negatives))
            for i, qs in got.items():  # row p at step j is fed token p+j: the target's query at p+j
                q = qs.pop()[0, 1 : batch.tokens.shape[0] - j]
                theirs = queries[layer_types[i]][j + 1 :].to(q.dtype)
                losses.append(query_weight * (1 - F.cosine_similarity(q, theirs, dim=-1).mean()))
    return torch.stack(losses).mean()


def _step_losses(
    j: int,
    states: torch.Tensor,
    batch: TeacherBatch,
    weight: torch.Tensor,
    embedder: Gemma4AssistantMaskedEmbedder | None,
    cluster_of: torch.Tensor | None,
    negatives: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The token (and centroid) loss of draft step j."""
    valid = batch.tokens.shape[0] - j
    labels = batch.labels[j + 1 : j + valid]
    keep = labels >= 0
    if not bool(keep.any()):
        return []
    rows, labels = states[1:valid][keep], labels[keep]
    cand = None
    if negatives is not None:
        if batch.top_ids is not None:
            cand = batch.top_ids[j + 1 : j + valid][keep]
        elif embedder is not None:
            assert cluster_of is not None  # computed whenever there is an embedder
            members = embedder.token_ordering.view(embedder.num_centroids, -1)[cluster_of[labels]]
            cand = torch.cat([labels[:, None], members], dim=-1)
        else:
            cand = labels[:, None]
    loss = _token_loss(rows, weight, labels, cand, negatives)
    if embedder is not None:
        assert cluster_of is not None
        loss = loss + F.cross_entropy(embedder.centroids(rows), cluster_of[labels])
    return [loss]


def token_clusters(token_ordering: torch.Tensor, num_centroids: int) -> torch.Tensor:
    """Each token's cluster under a centroid head's ordering (cluster c holds ordering.view(C, -1)[c])."""
    per_cluster = token_ordering.numel() // num_centroids
    clusters = torch.empty_like(token_ordering)
    clusters[token_ordering] = torch.arange(token_ordering.numel(), device=token_ordering.device) // per_cluster
    return clusters


def draft_argmax(assistant: Gemma4AssistantForCausalLM, states: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The tokens the assistant's head (`weight`, its LM head in the states' dtype) drafts greedily
    from `states` (N, Ha), as at inference: over the whole vocabulary, or the top clusters' tokens."""
    if assistant.masked_embedding is None:
        return (states @ weight.T).argmax(-1)
    emb = assistant.masked_embedding
    top = emb.centroids(states).topk(emb.centroid_intermediate_top_k).indices  # (N, K)
    members = emb.token_ordering.view(emb.num_centroids, -1)
    # Score (state, cluster) pairs cluster by cluster: one small matmul per cluster instead of
    # gathering K * V/C head rows for every state (gigabytes for a held-out set).
    pair_state = torch.arange(states.shape[0], device=states.device).repeat_interleave(top.shape[1])
    pair_cluster = top.flatten()
    order = pair_cluster.argsort()
    best = torch.empty(pair_cluster.shape, dtype=states.dtype, device=states.device)
    token = torch.empty_like(pair_cluster)
    start = 0
    for c, n in enumerate(torch.bincount(pair_cluster, minlength=emb.num_centroids).tolist()):
        if n:
            idx = order[start : start + n]
            best[idx], i = (states[pair_state[idx]] @ weight[members[c]].T).max(-1)
            token[idx] = members[c][i]
            start += n
    return token.view_as(top).gather(-1, best.view_as(top).argmax(-1, keepdim=True)).squeeze(-1)


@torch.no_grad()
def heldout_acceptance(
    assistant: Gemma4AssistantForCausalLM, target: TargetModel, batches: Sequence[TeacherBatch], draft_steps: int
) -> list[float]:
    """Per draft position j, the fraction of drafts equal to the target's greedy token given that
    drafts 1..j-1 were; positions where the text itself leaves the target's greedy path are skipped,
    because there the teacher-forced inputs are not what drafting would see."""
    drafted = [0] * draft_steps
    accepted = [0] * draft_steps
    weight = assistant.lm_head.weight.float()
    for batch in batches:
        alive = None
        for j, states in unrolled_states(assistant, target, batch, draft_steps):
            valid = batch.tokens.shape[0] - j
            labels = batch.labels[j + 1 : j + valid]
            ok = draft_argmax(assistant, states[1:valid], weight) == labels
            if alive is None:
                alive = labels >= 0
            else:  # the fed token x_{p+j} must be what the previous draft (the target's greedy) was
                alive = alive[: valid - 1] & (batch.tokens[j + 1 : j + valid] == batch.labels[j : j + valid - 1]) & (labels >= 0)
            drafted[j] += int(alive.sum())
            alive = alive & ok
            accepted[j] += int(alive.sum())
    return [a / d if d else 0.0 for a, d in zip(accepted, drafted)]


def expected_accepted_length(rates: Sequence[float]) -> float:
    """Tokens per target forward at draft length len(rates): 1 + sum over j of P(drafts 1..j accepted)."""
    total, alive = 1.0, 1.0
    for r in rates:
        alive *= r
        total += alive
    return total
