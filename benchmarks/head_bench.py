"""The LM head on CPU: the greedy choice over a head's logits, `argmax` vs our `engine.head.greedy_ids`;
and the greedy choice straight from the hidden rows, head included: the logits whole (`linear`, as
transformers runs it) then `greedy_ids`, vs a slice of the vocabulary at a time
(`engine.head.greedy_rows`, which the engine takes from SLICED_ARGMAX_ROWS rows on).

A 262,144 x 640 head (Gemma 3 270M's shape; random weights, the time does not depend on them).
Rows 1 is a decode step, 2-17 a verification of 1-16 draft tokens, more a batch of requests' drafts.

    python -m benchmarks.head_bench --out benchmarks/results/head-cpu.json
    python -m benchmarks.head_bench --vocab 4096 --rows 1 5 --repeats 2     # smoke run
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from langchain_gemma_mtp.engine import head
from langchain_gemma_mtp.engine.head import greedy_ids, greedy_rows

from .common import median_seconds, parser, set_threads, write_results


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 5, 17, 32, 48, 96, 160])
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    set_threads(args.threads)
    head.SLICED_ARGMAX_ROWS = 0  # the sliced form at every row count, to compare
    rows = []
    print("| dtype | rows | head ms | argmax ms | greedy_ids ms | head + greedy_ids ms | sliced ms | sliced speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(args.vocab, args.hidden, dtype=dtype)
        for n in args.rows:
            x = torch.randn(n, args.hidden, dtype=dtype)
            logits = F.linear(x, weight)
            sliced = lambda: greedy_rows(lambda columns: F.linear(x, weight[columns]), n, args.vocab, x.device)  # noqa: E731
            assert torch.equal(logits.argmax(-1), greedy_ids(logits)) and torch.equal(sliced(), greedy_ids(logits))
            row = dict(
                dtype=str(dtype).removeprefix("torch."),
                rows=n,
                head_s=median_seconds(lambda: F.linear(x, weight), args.repeats),
                argmax_s=median_seconds(lambda: logits.argmax(-1), args.repeats),
                greedy_ids_s=median_seconds(lambda: greedy_ids(logits), args.repeats),
                whole_s=median_seconds(lambda: greedy_ids(F.linear(x, weight)), args.repeats),
                sliced_s=median_seconds(sliced, args.repeats),
            )
            rows.append(row)
            ms = {k: f"{v * 1e3:.1f}" for k, v in row.items() if k.endswith("_s")}
            print(
                f"| {row['dtype']} | {n} | {ms['head_s']} | {ms['argmax_s']} | {ms['greedy_ids_s']} | {ms['whole_s']} | {ms['sliced_s']}"
                f" | x{row['whole_s'] / row['sliced_s']:.2f} |",
                flush=True,
            )
    write_results(args.out, args, rows=rows)


if __name__ == "__main__":
    main()
