"""The LM head over a few rows: transformers' `linear` vs our `engine.head.project`, per dtype and row count;
and the greedy choice over its logits: `argmax` vs our `engine.verify.greedy_ids`.

A 262,144 x 640 head (Gemma 3 270M's shape; random weights, the time does not depend on them).
Rows 1 is a decode step, 2-17 a verification of 1-16 draft tokens.

    python -m benchmarks.head_bench --out benchmarks/results/head-cpu.json
    python -m benchmarks.head_bench --vocab 4096 --rows 1 5 --repeats 2     # smoke run
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from langchain_gemma_mtp.engine.head import project
from langchain_gemma_mtp.engine.verify import greedy_ids

from .common import median_seconds, parser, set_threads, write_results


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--vocab", type=int, default=262144)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 9, 17])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    set_threads(args.threads)
    rows = []
    print("| dtype | rows | linear ms | project ms | speedup | argmax ms | greedy_ids ms |\n|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        weight = torch.randn(args.vocab, args.hidden, dtype=dtype)
        for n in args.rows:
            x = torch.randn(n, args.hidden, dtype=dtype)
            ref = median_seconds(lambda: F.linear(x, weight), args.repeats)
            ours = median_seconds(lambda: project(x, weight), args.repeats)
            logits = project(x, weight)
            assert torch.equal(logits.argmax(-1), greedy_ids(logits))
            arg = median_seconds(lambda: logits.argmax(-1), args.repeats)
            greedy = median_seconds(lambda: greedy_ids(logits), args.repeats)
            rows.append(
                dict(dtype=str(dtype).removeprefix("torch."), rows=n, linear_s=ref, project_s=ours, argmax_s=arg, greedy_ids_s=greedy)
            )
            print(
                f"| {rows[-1]['dtype']} | {n} | {ref * 1e3:.1f} | {ours * 1e3:.1f} | x{ref / ours:.2f} | {arg * 1e3:.2f} | {greedy * 1e3:.2f} |",
                flush=True,
            )
    write_results(args.out, args, rows=rows)


if __name__ == "__main__":
    main()
