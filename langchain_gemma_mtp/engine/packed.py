"""The attention the engine's target forwards run through: several requests' rows packed into one
sequence for a batched forward (padded for attention only), and query heads folded onto shared K/V
heads instead of copying K/V per head.

A batched forward (engine/batch.py) feeds every request's block of tokens as one sequence of batch
1: embeddings, norms, projections, MLPs and the LM head run on the real rows only, with no padding
row among them. Attention is the one step that needs each request apart (its own cache, its own
mask): for it the attention here spreads the packed queries into a (requests, longest block)
batch, runs the model's own attention (sdpa or eager) on it with the per-request masks and the
padded K/V that `BatchCache` hands over, and packs the output back.

Grouped-query attention with a mask and several query rows (every verification forward) makes
transformers' sdpa copy each K/V head once per query head it serves; `_sdpa` folds those query
heads into the rows of their K/V head instead, as transformers does for a single row.

`engine_attention` sets the text config's attention implementation to a name registered here for
the length of each target forward of the engine (TargetModel.run_decoder; not Gemma 4's sliced
prefill, which tells sdpa apart by its name), on the owner thread. Another thread running the
same model meanwhile gets the same function with no packing, which attends as `_sdpa` or the
model's eager function would, and the mask functions registered under these names are the
originals.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

PACKING_KWARG = "packed_rows"


@dataclass(frozen=True)
class PackedRows:
    """Where each packed row goes in the padded (requests, longest) layout; with `groups`, each group
    of requests (prompt chunks beside verification blocks) is padded and attends on its own."""

    index: torch.Tensor  # (rows,) flat slot of each packed row in requests * longest
    requests: int
    longest: int
    groups: tuple[Group, ...] = ()

    @classmethod
    def of(cls, widths: list[int], device: torch.device, starts: Sequence[int] = (0,)) -> PackedRows:
        """The layout of requests fed `widths` rows each; `starts`: the first request of each group
        attending apart (one group: all attend together)."""
        longest = max(widths)
        index = torch.cat([i * longest + torch.arange(w) for i, w in enumerate(widths)]).to(device)
        if len(starts) < 2:
            return cls(index, len(widths), longest)
        bounds = [*starts, len(widths)]
        groups = tuple(
            Group(slice(a, b), slice(sum(widths[:a]), sum(widths[:b])), cls.of(widths[a:b], device)) for a, b in itertools.pairwise(bounds)
        )
        return cls(index, len(widths), longest, groups)

    def spread(self, query: torch.Tensor) -> torch.Tensor:
        """(1, heads, rows, dim) packed queries as (requests, heads, longest, dim), zero-padded."""
        rows = query[0].transpose(0, 1)  # (rows, heads, dim)
        padded = rows.new_zeros(self.requests * self.longest, *rows.shape[1:])
        padded[self.index] = rows
        return padded.view(self.requests, self.longest, *rows.shape[1:]).transpose(1, 2)

    def pack(self, out: torch.Tensor) -> torch.Tensor:
        """Attention's (requests, longest, heads, dim) output as (1, rows, heads, dim)."""
        return out.reshape(self.requests * self.longest, *out.shape[2:])[self.index].unsqueeze(0)


@dataclass(frozen=True)
class Group:
    """Requests of a batched forward that attend apart from the others: their requests and packed rows."""

    requests: slice
    rows: slice
    layout: PackedRows


def _keys_seen(mask: torch.Tensor) -> int:
    """How many leading keys any row of a (requests, 1, rows, keys) mask sees (bool, or additive: 0 seen)."""
    seen = mask if mask.dtype == torch.bool else mask == 0
    return int(seen.flatten(0, 2).any(0).nonzero()[-1]) + 1


def _eager_of(module: torch.nn.Module):
    """The model's own eager attention (Gemma's has its softcapping), from its modeling module."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa, except for (B, heads, rows, dim) queries over fewer K/V heads with a
    head-shared mask: each K/V head's query heads become its rows, so K/V are read in place rather
    than repeated per query head. In bf16 on CPU that is 2-3x faster at 16 requests or a 4k context,
    bit for bit the same (benchmarks/attention_bench.py); float32 keeps transformers' path, as its sums
    would be reordered and float32 greedy output must equal transformers' own."""
    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, rows, dim = query.shape
    plain = groups == 1 or rows == 1 or query.dtype == torch.float32 or attention_mask is None or attention_mask.shape[1] != 1
    if plain or kwargs.get("dropout") or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = F.scaled_dot_product_attention(
        query.reshape(batch, heads // groups, groups * rows, dim),  # head kv*groups + g: row g*rows + r of head kv
        key,
        value,
        attn_mask=attention_mask.repeat(1, 1, groups, 1),
        scale=kwargs.get("scaling"),
    )
    return out.reshape(out.shape[0], heads, rows, -1).transpose(1, 2).contiguous(), None


def _attention(base: str):
    def attend(module, query, key, value, attention_mask, **kwargs):
        packing: PackedRows | None = kwargs.pop(PACKING_KWARG, None)
        original = _sdpa if base == "sdpa" else _eager_of(module)
        if packing is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        if not packing.groups:
            out, _ = original(module, packing.spread(query), key, value, attention_mask, **kwargs)
            return packing.pack(out), None
        # Each group padded to its own longest block and its own longest K/V: a 256-row prompt
        # chunk would otherwise pad every verification block beside it to 256 query rows.
        outs = []
        for group in packing.groups:
            mask = attention_mask[group.requests, :, : group.layout.longest]
            keys = _keys_seen(mask)
            out, _ = original(
                module,
                group.layout.spread(query[:, :, group.rows]),
                key[group.requests, :, :keys],
                value[group.requests, :, :keys],
                mask[..., :keys],
                **kwargs,
            )
            outs.append(group.layout.pack(out))
        return torch.cat(outs, dim=1), None

    return attend


_NAMES = {base: f"gemma_mtp_packed_{base}" for base in ("sdpa", "eager")}
for _base, _name in _NAMES.items():
    AttentionInterface.register(_name, _attention(_base))
    AttentionMaskInterface.register(_name, ALL_MASK_ATTENTION_FUNCTIONS[_base])


@contextlib.contextmanager
def engine_attention(config) -> Iterator[None]:
    """While inside, the model of this text `config` attends through this module's implementation
    (sdpa or eager models only: `TargetModel.verifies_trees`), which packs rows when the forward
    passes PACKING_KWARG."""
    base = config._attn_implementation
    config._attn_implementation_internal = _NAMES[base]
    try:
        yield
    finally:
        config._attn_implementation_internal = base
