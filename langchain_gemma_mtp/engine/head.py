"""Vocabulary projections, written for speed: the LM head over a few rows, and the centroid head's candidates.

On CPU in float32, `linear(x, W)` with a 262k-row W and the few rows of x of a decode or verify
step takes a slow path, while the same product written as `W @ x.T` streams W once. One row is fed
as two, since the one-row product is a matrix-vector call with no fast path. Other devices and
dtypes keep `linear` (bfloat16 on CPU: `linear` is as fast as any other form tried).
benchmarks/head_bench.py measures both; docs/benchmarks.md has the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`hidden @ weight.T` for hidden (..., H) and weight (V, H), in the fastest form for the device."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return F.linear(hidden, weight)
    rows = hidden.reshape(-1, hidden.shape[-1])
    n = rows.shape[0]
    if n == 1:
        rows = torch.cat([rows, rows])
    return (weight @ rows.T).T[:n].reshape(*hidden.shape[:-1], weight.shape[0])


def centroid_candidates(embedder, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gemma 4 assistant's centroid head without the vocabulary-sized output: for hidden (..., H),
    the token ids of its top clusters and their logits, both (..., top_k * V/C); other tokens are masked."""
    top = embedder.centroids(hidden).topk(embedder.centroid_intermediate_top_k).indices
    ids = embedder.token_ordering.view(embedder.num_centroids, -1)[top].flatten(-2)
    # index_select, not weight[ids]: advanced indexing copies the candidate rows several times slower on CPU.
    rows = weight.index_select(0, ids.reshape(-1)).view(*ids.shape, weight.shape[-1])
    return ids, (rows @ hidden.unsqueeze(-1)).squeeze(-1)
