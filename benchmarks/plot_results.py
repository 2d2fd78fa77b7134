"""Bar chart of tokens/s by workload kind and method from engine_bench.py result files (matplotlib).

    python -m benchmarks.plot_results benchmarks/results/engine-270m-bf16.json \
        benchmarks/results/engine-270m-fp32.json --out docs/img/engine-270m.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

METHODS = ("hf greedy", "hf prompt lookup", "ours none", "ours ngram", "ours ngram hint", "ours hybrid", "ours hybrid hint")


def per_kind(rows: list[dict]) -> dict[str, dict[str, float]]:
    """kind -> method -> tokens/s (total tokens over total seconds), methods named without their k."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        method = r["method"].split(" k=")[0]
        if method in METHODS:
            cell = out.setdefault(r["kind"], {}).setdefault(method, [0.0, 0.0])
            cell[0] += r["tokens"]
            cell[1] += r["secs"]
    return {kind: {m: t / s for m, (t, s) in cells.items()} for kind, cells in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fig, axes = plt.subplots(len(args.results), 1, figsize=(11, 3.6 * len(args.results)), squeeze=False)
    for ax, path in zip(axes[:, 0], args.results):
        data = json.loads(path.read_text())
        table = per_kind(data["rows"])
        kinds = sorted(table)
        methods = [m for m in METHODS if any(m in table[k] for k in kinds)]
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            xs = [j + i * width for j in range(len(kinds))]
            ax.bar(xs, [table[k].get(m, 0.0) for k in kinds], width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], kinds)
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{data['title']}, {data['args'].get('dtype')}, {data['args'].get('threads')} threads")
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
