"""Verification attention over shared K/V heads: transformers' sdpa (which repeats each K/V head once
per query head it serves whenever a mask is given and several rows are verified) vs the engine's
(`engine.packed._sdpa`, which folds those query heads into the rows of their K/V head), per dtype
and shape, with the outputs compared.

Shapes: the embedded Gemma 3 270M (4 query heads on 1 K/V head, head dim 256) verifying 16
requests' drafts at once and one request alone; a Gemma 4 E2B-shaped layer (8 on 1) verifying one
request after a 4,096-token context, 4 requests after 2,048 (head dim 512, its full layers), and 16
after 1,024. Random tensors: the time does not depend on the values.

    python -m benchmarks.attention_bench --out benchmarks/results/attention-cpu.json
    python -m benchmarks.attention_bench --repeats 2     # smoke run
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from langchain_gemma_mtp.engine.packed import _sdpa

from .common import median_seconds, parser, set_threads, write_results

# (what, requests, query heads, K/V heads, rows verified per request, context, head dim)
SHAPES = (
    ("270M, 16 requests", 16, 4, 1, 6, 230, 256),
    ("270M, alone", 1, 4, 1, 8, 300, 256),
    ("E2B, alone, 4k context", 1, 8, 1, 8, 4096, 256),
    ("E2B full layer, 4 requests, 2k", 4, 8, 1, 8, 2048, 512),
    ("E2B, 16 requests, 1k", 16, 8, 1, 6, 1024, 256),
)


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    set_threads(args.threads)
    rows = []
    print("| dtype | shape | transformers ms | engine ms | speedup | same output |\n|---|---|---|---|---|---|")
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for what, batch, heads, kv_heads, width, context, dim in SHAPES:
                g = torch.Generator().manual_seed(0)
                query = torch.randn(batch, heads, width, dim, generator=g).to(dtype)
                key, value = (torch.randn(batch, kv_heads, context, dim, generator=g).to(dtype) for _ in range(2))
                mask = torch.ones(batch, 1, width, context, dtype=torch.bool).tril(context - width)
                module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True)  # what sdpa reads of the module
                theirs = median_seconds(lambda: sdpa_attention_forward(module, query, key, value, mask), args.repeats)
                ours = median_seconds(lambda: _sdpa(module, query, key, value, mask), args.repeats)
                same = torch.equal(_sdpa(module, query, key, value, mask)[0], sdpa_attention_forward(module, query, key, value, mask)[0])
                rows.append(
                    dict(dtype=str(dtype).removeprefix("torch."), shape=what, transformers_s=theirs, engine_s=ours, bitwise_equal=same)
                )
                print(
                    f"| {rows[-1]['dtype']} | {what} | {theirs * 1e3:.2f} | {ours * 1e3:.2f} | x{theirs / ours:.2f} | {same} |", flush=True
                )
    write_results(args.out, args, rows=rows)


if __name__ == "__main__":
    main()
