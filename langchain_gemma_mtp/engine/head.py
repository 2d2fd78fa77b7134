"""Vocabulary projections, written for speed: the greedy choice over many rows a slice of the
vocabulary at a time, and the centroid head's candidates. benchmarks/head_bench.py measures them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .openmp import release_thread_team

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


def _probe_fp16_gemm() -> bool:
    """fbgemm's fp16-weight GEMM (x86 builds of torch): check once that it is there and computes the product."""
    x, weight = torch.ones(2, 8), torch.arange(24, dtype=torch.float32).view(3, 8)
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
        return torch.equal(torch.ops.quantized.linear_dynamic_fp16(x, packed), x @ weight.T)
    except (AttributeError, RuntimeError):
        return False


FP16_GEMM = _probe_fp16_gemm()


def _fits_fp16(weight: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(weight)  # no weight-sized temporary, as `abs()` would make
    return bool(hi < 65504 and lo > -65504)


class ScreenedHead:
    """The exact greedy choice of a float32 head, screened through an fp16 copy of its weight.

    fbgemm's fp16-weight GEMM reads half the bytes and has its own AVX2 kernels: the 270M's 262k-row
    head on the EPYC, 13 ms against oneDNN's 23 at one row, 17 against 54 at 5, 48 against 73 at 17
    (docs/research-notes.md, "An fp16 screen for the greedy head"). Its logits are off by at most
    `|x| * slack` per row x, a bound proved from the weight alone:

        |fp16 logit - float32 logit| <= |x| |w16 - w| (the weight's rounding, per token)
                                      + |x| |w| (2^-11 + 2 gamma_d) (x rounded to fp16, if fbgemm does,
                                                                    and both sums' float32 rounding)

    with gamma_d = d u / (1 - d u), u = 2^-24, and slack the largest per-token value (x1.01 for
    the norms' own rounding). So the token the float32 logits choose scores, in the fp16 ones,
    within 2 |x| slack of their best: where no other token does, the best fp16 token is the greedy
    token; elsewhere those candidates alone are scored in float32. Every row's answer is proved,
    not guessed: the output stays the target's own, up to float32's rounding between kernels as
    with every product form (an exact tie goes to the first index, as `argmax`). Costs an fp16
    copy of the head (335 MB for the 270M), packed once (4 s for it on one core of the EPYC; the
    target packs it in the background at load, TargetModel.pack_screen)."""

    def __init__(self, weight: torch.Tensor, softcap: float | None = None):
        self.weight = weight
        self.softcap = softcap
        rows, d = weight.shape
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        worst = 0.0
        # In slices the size of a core's cache, not a second copy of the head: 0.14 s for the 270M's
        # against 0.66 s in 16,384-row slices.
        for start in range(0, rows, 1024):
            w = weight[start : start + 1024]
            half = w.half().float()  # half - w is exact in float32; the norms' rounding is in the x1.01
            per_token = (half - w).norm(dim=1) + (2.0**-11 + 2 * gamma) * (1 + 2.0**-11) * torch.maximum(half.norm(dim=1), w.norm(dim=1))
            worst = max(worst, float(per_token.max()))
        self.slack = 1.01 * worst
        # x's entries below fp16's normal range round by up to 2^-25 each, whatever |x| is.
        self.floor = d**0.5 * 2.0**-25 * float(weight.norm(dim=1).max()) * 1.01
        # The norms ran on an OpenMP team of this thread's own; the pack runs on this thread alone,
        # for seconds, and a parked team beside other threads' would slow their ops (openmp.py).
        release_thread_team()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, None)
        self.rescored = 0  # rows whose candidates were scored in float32 (the rest: proved by the screen alone)

    @staticmethod
    def applies(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """A float32 CPU head without bias whose weight fp16 holds (no entry past its range)."""
        cpu_float32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        return FP16_GEMM and bias is None and cpu_float32 and _fits_fp16(weight)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Each row's greedy token, as `greedy_ids` of the float32 logits (softcapped) gives it; None
        where the screen cannot prove it (a row not finite, or past the softcap's nearly flat part)."""
        approx = torch.ops.quantized.linear_dynamic_fp16(hidden, self.packed)
        top = approx.topk(2, dim=-1)
        margin = 2 * (hidden.norm(dim=-1) * self.slack + self.floor)
        best = top.values[:, 0]
        if not bool(torch.isfinite(best).all() and torch.isfinite(margin).all()):
            return None
        if self.softcap and bool((best.abs() > 2 * self.softcap).any()):
            return None  # tanh flattens there: float32 ties among tokens the screen would have set apart
        ids = top.indices[:, 0].clone()
        for row in (top.values[:, 1] >= best - margin).nonzero().flatten().tolist():
            candidates = (approx[row] >= best[row] - margin[row]).nonzero().flatten()  # ascending: first index wins ties
            # Row by row with one reduction, so that equal weight rows score equal (a GEMM may not).
            logits = (self.weight.index_select(0, candidates) * hidden[row]).sum(-1)
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            ids[row] = candidates[greedy_ids(logits)]
            self.rescored += 1
        return ids
