"""Several requests' rows packed into one sequence for a batched forward, padded for attention only.

A batched forward (engine/batch.py) feeds every request's block of tokens as one sequence of batch
1: embeddings, norms, projections, MLPs and the LM head run on the real rows only, with no padding
row among them. Attention is the one step that needs each request apart (its own cache, its own
mask): for it, and only while a packed forward runs, the model's attention implementation is
swapped for one that spreads the packed queries into a (requests, longest block) batch, runs the
model's own attention (sdpa or eager) on it with the per-request masks and the padded K/V that
`BatchCache` hands over, and packs the output back.

The swap sets the text config's attention implementation to a name registered here for the length
of the forward, on the owner thread. Another thread running the same model meanwhile gets the
same function with no packing, which hands its call straight to the original implementation, and
the mask functions registered under these names are the originals too.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

PACKING_KWARG = "packed_rows"


@dataclass(frozen=True)
class PackedRows:
    """Where each packed row goes in the padded (requests, longest) layout."""

    index: torch.Tensor  # (rows,) flat slot of each packed row in requests * longest
    requests: int
    longest: int

    @classmethod
    def of(cls, widths: list[int], device: torch.device) -> PackedRows:
        longest = max(widths)
        index = torch.cat([i * longest + torch.arange(w) for i, w in enumerate(widths)]).to(device)
        return cls(index, len(widths), longest)

    def spread(self, query: torch.Tensor) -> torch.Tensor:
        """(1, heads, rows, dim) packed queries as (requests, heads, longest, dim), zero-padded."""
        rows = query[0].transpose(0, 1)  # (rows, heads, dim)
        padded = rows.new_zeros(self.requests * self.longest, *rows.shape[1:])
        padded[self.index] = rows
        return padded.view(self.requests, self.longest, *rows.shape[1:]).transpose(1, 2)

    def pack(self, out: torch.Tensor) -> torch.Tensor:
        """Attention's (requests, longest, heads, dim) output as (1, rows, heads, dim)."""
        return out.reshape(self.requests * self.longest, *out.shape[2:])[self.index].unsqueeze(0)


def _eager_of(module: torch.nn.Module):
    """The model's own eager attention (Gemma's has its softcapping), from its modeling module."""
    return sys.modules[type(module).__module__].eager_attention_forward


def _attention(base: str):
    def attend(module, query, key, value, attention_mask, **kwargs):
        packing: PackedRows | None = kwargs.pop(PACKING_KWARG, None)
        original = sdpa_attention_forward if base == "sdpa" else _eager_of(module)
        if packing is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        out, _ = original(module, packing.spread(query), key, value, attention_mask, **kwargs)
        return packing.pack(out), None

    return attend


_NAMES = {base: f"gemma_mtp_packed_{base}" for base in ("sdpa", "eager")}
for _base, _name in _NAMES.items():
    AttentionInterface.register(_name, _attention(_base))
    AttentionMaskInterface.register(_name, ALL_MASK_ATTENTION_FUNCTIONS[_base])


@contextlib.contextmanager
def packed_attention(config) -> Iterator[None]:
    """While inside, the model of this text `config` attends through the packed implementation
    (sdpa or eager models only: `TargetModel.verifies_trees`)."""
    base = config._attn_implementation
    config._attn_implementation_internal = _NAMES[base]
    try:
        yield
    finally:
        config._attn_implementation_internal = base
