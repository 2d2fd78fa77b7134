"""One target forward over several requests: each request's block of tokens (a draft chain or tree to
verify, or a chunk of its prompt) after its own KV cache, packed into one sequence.

Every request keeps its own DynamicCache, so rollback, the prefix cache and the drafters work as for
a request alone. The blocks are fed as one sequence of batch 1 (engine/packed.py), so embeddings,
projections, MLPs and the LM head run on real rows only. For attention, `BatchCache` stands in for
the model's cache: each layer's new K/V rows are appended to each request's own cache, and what the
layer attends to is those caches' visible K/V side by side, zero-padded to the longest, with the
queries spread to match and per-request masks hiding the padding. The weights are read once for the
whole batch, so a forward verifying several requests' drafts costs much less than one forward each;
each verified row still pays for its logits (docs/benchmarks.md, "Parallel agents sharing
forwards", has what that leaves on the 270M).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .costs import CostModel
from .packed import PackedRows
from .target import Forward, TargetModel
from .tree import DraftTree


@dataclass
class Feed:
    """What one request asks of the target: `tokens` run after what `cache` holds.

    `tree`: the tokens are a draft tree's block (each attends to its ancestors only). `prefill`:
    a prompt chunk, whose logits are needed at its last row only when `last` is set (no row at
    all before). The Forward sent back carries `logits` for those rows, or with `greedy` (a block
    whose verdict needs each row's argmax and nothing else) `argmax` instead.
    """

    target: TargetModel
    tokens: list[int]
    cache: DynamicCache
    tree: DraftTree | None = None
    prefill: bool = False
    last: bool = True
    costs: CostModel | None = None  # where the time of a verification forward is measured (its engine's)
    greedy: bool = False  # the verdict reads each row's argmax only: no logits kept (engine/head.py)

    @property
    def width(self) -> int:
        return len(self.tokens)


class BatchCache:
    """The cache a batched forward writes through: layer by layer, each request's rows go to its own
    cache, and the layer attends to all requests' visible K/V padded to one tensor."""

    def __init__(self, caches: list[DynamicCache], widths: list[int]):
        self.caches = caches
        self.starts = [sum(widths[:i]) for i in range(len(widths))]
        self.widths = widths
        self.lengths: dict[int, list[int]] = {}  # per layer: each request's visible K/V length

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed (1, heads, rows, dim) new K/V in; each request's visible K/V, padded, out."""
        parts = [
            cache.update(keys[:, :, s : s + w], values[:, :, s : s + w], layer_idx)
            for cache, s, w in zip(self.caches, self.starts, self.widths)
        ]
        self.lengths[layer_idx] = [k.shape[-2] for k, _ in parts]
        return _pad([k for k, _ in parts]), _pad([v for _, v in parts])


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """(1, H, L_i, D) tensors as one (B, H, max L_i, D), zero-padded at the end."""
    longest = max(r.shape[-2] for r in rows)
    # Only the tails are zeroed (masked keys must still be finite: 0 * NaN would poison a row):
    # zero-filling the whole tensor first wrote it twice, 20-40% of this copy's time.
    out = rows[0].new_empty(len(rows), rows[0].shape[1], longest, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, :, : r.shape[-2]] = r[0]
        out[i, :, r.shape[-2] :] = 0
    return out


def _block(feed: Feed) -> tuple[torch.Tensor, torch.Tensor]:
    """A feed's depth per token and its (width, width) ancestry: a tree's, or a causal chain's."""
    if feed.tree is not None:
        return torch.tensor(feed.tree.depths()), feed.tree.ancestry()
    return torch.arange(feed.width), torch.ones(feed.width, feed.width, dtype=torch.bool).tril()


def run_batch(target: TargetModel, feeds: list[Feed]) -> list[Forward]:
    """One forward over several requests' verification blocks or prompt chunks; each gets the
    Forward (hidden rows, the drafter's K/V, logits where `run_feed` gives them) it would get alone."""
    device = target.device
    widths = [f.width for f in feeds]
    longest = max(widths)
    ids, positions = [], []
    masks: dict[str, list[torch.Tensor]] = {}
    for feed in feeds:
        depths, ancestry = _block(feed)
        pos = feed.cache.get_seq_length() + depths
        ids.extend(feed.tokens)
        positions.append(pos)
        for layer_type, mask in target.block_masks(feed.cache, pos.to(device), ancestry).items():
            masks.setdefault(layer_type, []).append(mask)
    batched = {t: target.attention_mask(_pad_masks(m, longest)) for t, m in masks.items()}
    cache = BatchCache([f.cache for f in feeds], widths)
    out = target.run_decoder(
        torch.tensor([ids], device=device),
        cache,
        attention_mask=batched if target.layer_types else batched["full_attention"],
        position_ids=torch.cat(positions)[None].to(device),
        # packed.PACKING_KWARG, read by the engine's attention: prompt chunks attend apart from blocks.
        packed_rows=PackedRows.of(widths, device, [i for i, f in enumerate(feeds) if not i or f.prefill != feeds[i - 1].prefill]),
    )
    hidden = list(out.last_hidden_state[0].split(widths))
    # Logits where each feed needs them: every row of a block, the last row of a prompt's last
    # chunk; greedy blocks' argmax in one pass over all their rows, the logits never kept.
    wanted = [h if not f.prefill else h[-1:] if f.last else h[:0] for f, h in zip(feeds, hidden)]
    logits = _each_feeds(target.logits, [w if not f.greedy else w[:0] for f, w in zip(feeds, wanted)])
    argmax = _each_feeds(target.greedy, [w if f.greedy else w[:0] for f, w in zip(feeds, wanted)])
    forwards = []
    for i, (feed, h) in enumerate(zip(feeds, hidden)):
        shared = None
        if target.returns_shared_kv:
            # The storing layer's K/V as the batch saw them: this request's visible rows only.
            shared = {
                t: (k[i : i + 1, :, : _visible(cache, target, t, i)], v[i : i + 1, :, : _visible(cache, target, t, i)])
                for t, (k, v) in out.shared_kv_states.items()
            }
        fwd = Forward(h, shared)
        if feed.greedy:
            fwd.argmax = argmax[i]
        elif not feed.prefill or feed.last:
            fwd.logits = logits[i]
        forwards.append(fwd)
    return forwards


def _each_feeds(head: Callable[[torch.Tensor], torch.Tensor], rows: list[torch.Tensor]) -> list[torch.Tensor]:
    """`head` over every feed's rows at once, split back per feed (nothing run when no feed has rows)."""
    counts = [len(r) for r in rows]
    if not sum(counts):
        return [r[:0] for r in rows]
    return list(head(torch.cat(rows)).split(counts))


def _visible(cache: BatchCache, target: TargetModel, layer_type: str, i: int) -> int:
    """How many K/V rows request i's layers of `layer_type` handed attention in the batched forward."""
    layer = max(j for j in cache.lengths if target.layer_types[j] == layer_type)
    return cache.lengths[layer][i]


def _pad_masks(masks: list[torch.Tensor], width: int) -> torch.Tensor:
    """(width_i, keys_i) bool masks as one (B, 1, width, max keys): padding keys hidden; a padding
    query row sees key 0 only (a row that sees nothing would give NaN; its output is dropped)."""
    keys = max(m.shape[1] for m in masks)
    out = torch.zeros(len(masks), 1, width, keys, dtype=torch.bool, device=masks[0].device)
    for i, m in enumerate(masks):
        out[i, 0, : m.shape[0], : m.shape[1]] = m
        out[i, 0, m.shape[0] :, 0] = True
    return out


def run_feed(feed: Feed) -> Forward:
    """One request's forward alone: a prompt chunk, or a verification block with no batch partner."""
    target = feed.target
    fwd = target.forward(feed.tokens, feed.cache, prefill=feed.prefill, tree=feed.tree)
    if feed.prefill:
        fwd.logits = target.logits(fwd.hidden[-1:]) if feed.last else None
    elif feed.greedy:
        fwd.argmax = target.greedy(fwd.hidden)
    else:
        fwd.logits = target.logits(fwd.hidden)
    return fwd


def run_feeds(feeds: list[Feed]) -> list[Forward]:
    """Several requests' verification blocks and prompt chunks on one target: one packed forward
    when the target's attention takes explicit masks, else one forward each. A target that slices
    its prefill (`TargetModel.slices_prefill`) runs each prompt chunk in a forward of its own."""
    if not feeds:
        return []
    target = feeds[0].target
    together = [i for i, f in enumerate(feeds) if not (f.prefill and target.slices_prefill)] if target.verifies_trees else []
    outs: dict[int, Forward] = {}
    if len(together) > 1:
        outs = dict(zip(together, run_batch(target, [feeds[i] for i in together])))
    return [outs[i] if i in outs else run_feed(f) for i, f in enumerate(feeds)]
