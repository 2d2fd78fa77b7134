"""Distill a Gemma 4 MTP assistant against any target the engine runs (teacher-forced, unrolled draft steps)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from .engine.target import TargetModel


@dataclass
class TeacherBatch:
    """What the target shows the assistant for one sequence, all positions at once."""

    tokens: torch.Tensor  # (T,)
    hidden: torch.Tensor  # (T, H) target final hidden states
    labels: torch.Tensor  # (T,) the target's own greedy prediction after each position
    shared_kv: dict[str, tuple[torch.Tensor, torch.Tensor]]  # full-length K/V per layer type


@torch.no_grad()
def teacher_batch(target: TargetModel, token_ids: Sequence[int]) -> TeacherBatch:
    cache = target.new_cache()
    fwd = target.forward(list(token_ids), cache)
    kv = fwd.shared_kv
    if kv is None:  # Gemma 3: the same tensors sit in the cache, full length before any crop
        kv = {t: (cache.layers[i].keys, cache.layers[i].values) for t, i in target.kv_layers.items()}
    labels = target.logits(fwd.hidden).argmax(-1)
    return TeacherBatch(torch.tensor(list(token_ids), device=target.device), fwd.hidden, labels, kv)


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


def unrolled_loss(assistant: PreTrainedModel, target: TargetModel, batch: TeacherBatch, draft_steps: int) -> torch.Tensor:
    """Cross-entropy of k unrolled draft steps from every position, teacher-forced on the sequence.

    Step j (1-based) from pending position p feeds token x_{p+j-1} with the previous step's state
    (the target's h_{p-1} for j=1) and learns the target's prediction after x_{p+j-1}.
    """
    T = batch.tokens.shape[0]
    device = batch.tokens.device
    window = getattr(assistant.config.get_text_config(), "sliding_window", T) or T
    masks = _draft_masks(T, window, device)
    positions = torch.arange(T, device=device)[None]
    h = torch.cat([batch.hidden[:1], batch.hidden[:-1]])[None]  # h_{p-1}; row 0 is a placeholder
    embed = target.embed
    losses = []
    for j in range(draft_steps):
        valid = T - j  # positions p with a token x_{p+j} and a label
        if valid <= 1:
            break
        tok = torch.cat([batch.tokens[j:], batch.tokens.new_zeros(j)])[None]
        x = assistant.pre_projection(torch.cat([embed(tok), h], dim=-1))
        out = assistant.model(inputs_embeds=x, attention_mask=masks, position_ids=positions,
                              shared_kv_states=batch.shared_kv, use_cache=False, logits_to_keep=None)
        last = out.last_hidden_state
        logits = assistant.lm_head(last)[0, 1:valid]
        labels = batch.labels[j + 1:j + valid]
        losses.append(torch.nn.functional.cross_entropy(logits.float(), labels))
        h = assistant.post_projection(last)
    return torch.stack(losses).mean()


def distill_assistant(
    assistant: PreTrainedModel,
    target: TargetModel,
    sequences: Iterable[Sequence[int]],
    *,
    steps: int = 200,
    draft_steps: int = 4,
    lr: float = 3e-3,
) -> list[float]:
    """Train `assistant` in place on the target's own predictions over `sequences`; return the losses."""
    batches = [teacher_batch(target, s) for s in sequences]
    target_params = {id(p) for p in target.model.parameters()}
    params = [p for p in assistant.parameters() if id(p) not in target_params]
    opt = torch.optim.AdamW(params, lr=lr)
    assistant.train()
    history = []
    for step in range(steps):
        loss = unrolled_loss(assistant, target, batches[step % len(batches)], draft_steps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assistant.eval()
    return history
