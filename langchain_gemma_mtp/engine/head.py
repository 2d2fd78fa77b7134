"""Vocabulary projections, written for speed: the greedy choice over many rows a slice of the
vocabulary at a time, and the centroid head's candidates. benchmarks/head_bench.py measures them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# From this many rows on CPU, the greedy choice is taken a slice of the vocabulary at a time, so the
# rows x vocabulary logits are never written out: on the 270M's 262k x 640 head, head and choice
# together, bf16 160 rows 100 -> 80 ms and 96 rows 70 -> 53 ms, level at 48, slower below; float32
# faster from 32 rows (benchmarks/head_bench.py). A batch verifying several requests' drafts crosses it.
SLICED_ARGMAX_ROWS = 48
ARGMAX_SLICE = 32768


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row, the first index on ties as `argmax`. `max` gives the same indices and
    is several times faster than `argmax` on a wide bfloat16 row on CPU, once per verified row;
    benchmarks/head_bench.py measures it."""
    return logits.max(-1).indices


def greedy_rows(logits: Callable[[slice], torch.Tensor], rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """`greedy_ids` of the (rows, vocab) logits that `logits(columns)` computes a slice of columns at
    a time: whole when few rows or off CPU, else slice by slice, keeping each row's best so far."""
    if device.type != "cpu" or rows < SLICED_ARGMAX_ROWS:
        return greedy_ids(logits(slice(None)))
    best = ids = torch.empty(0)
    for start in range(0, vocab, ARGMAX_SLICE):
        top = logits(slice(start, start + ARGMAX_SLICE)).max(-1)
        if not start:
            best, ids = top.values, top.indices
            continue
        # Strictly greater: on a tie the earlier slice keeps it, as argmax keeps the first index.
        better = top.values > best
        best, ids = torch.where(better, top.values, best), torch.where(better, top.indices + start, ids)
    return ids


def centroid_candidates(embedder, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gemma 4 assistant's centroid head without the vocabulary-sized output: for hidden (..., H),
    the token ids of its top clusters and their logits, both (..., top_k * V/C); other tokens are masked."""
    top = embedder.centroids(hidden).topk(embedder.centroid_intermediate_top_k).indices
    ids = embedder.token_ordering.view(embedder.num_centroids, -1)[top].flatten(-2)
    # index_select, not weight[ids]: advanced indexing copies the candidate rows several times slower on CPU.
    rows = weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1])
    return ids, (rows @ hidden.unsqueeze(-1)).squeeze(-1)
