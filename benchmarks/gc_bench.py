"""Python's full garbage collections during agent calls, with the loaded heap frozen (the default) and not.

A process that imported torch, transformers, LangChain and LangGraph tracks about half a million
objects, and each collection of the oldest generation walks them all with the GIL held
(engine/heap.py). Each setting runs in a fresh child process (`GEMMA_MTP_FREEZE_GC`=1 or 0, read at
load): the embedded 270M (bf16, n-gram drafting, 2 threads) behind ChatGemmaMTP runs the LangGraph
fan-out of benchmarks/batch_bench.py (4 branches at once, `--max-new` tokens each) `--runs` times,
each cold (`engine.forget()`). Reported per setting: the first run's wall time (what a new process
pays on its first agent step), the median of the runs after it, and every full collection's pause
(timed with `gc.callbacks`). Settings alternate over `--rounds` child processes each.

    python -m benchmarks.gc_bench --out benchmarks/results/gc-270m-bf16.json
    python -m benchmarks.gc_bench --rounds 1 --runs 2 --max-new 8     # smoke run
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time

from .common import REPO, parser, write_results


def child(runs: int, max_new: int, threads: int) -> None:
    """The child: the fan-out `runs` times; prints wall times and full-collection pauses as JSON."""
    from benchmarks.batch_bench import fan_out_graph
    from benchmarks.common import set_threads
    from langchain_gemma_mtp import ChatGemmaMTP
    from langchain_gemma_mtp.embedded import embedded_model_dir
    from langchain_gemma_mtp.engine import Engine

    set_threads(threads)
    engine = Engine.from_pretrained(str(embedded_model_dir()), drafter="ngram", dtype="bfloat16")
    graph = fan_out_graph(ChatGemmaMTP(engine=engine, max_tokens=max_new), max_new)
    pauses: list[float] = []
    started: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                started.append(time.perf_counter())
            elif started:
                pauses.append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)
    walls, per_run = [], []
    for _ in range(runs):
        engine.forget()
        before, start = len(pauses), time.perf_counter()
        graph.invoke({"task": "write", "results": []})
        walls.append(time.perf_counter() - start)
        per_run.append(pauses[before:])
    print(json.dumps({"walls": walls, "pauses": per_run, "frozen": gc.get_freeze_count()}))


def run(freeze: bool, args) -> dict:
    env = {**os.environ, "GEMMA_MTP_FREEZE_GC": "1" if freeze else "0"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gc_bench", "--as-child", str(args.runs), str(args.max_new), str(args.threads)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--as-child"]:
        child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=2, help="child processes per setting, alternating")
    ap.add_argument("--runs", type=int, default=8, help="fan-outs per child")
    ap.add_argument("--max-new", type=int, default=96)
    args = ap.parse_args()
    children: dict[str, list[dict]] = {"frozen": [], "not frozen": []}
    for _ in range(args.rounds):
        for name, freeze in (("frozen", True), ("not frozen", False)):
            children[name].append(run(freeze, args))
            print(f"{name}: {children[name][-1]['walls']}", flush=True)
    summary = {}
    for name, results in children.items():
        pauses = [p for r in results for run_pauses in r["pauses"] for p in run_pauses]
        later = [p for r in results for run_pauses in r["pauses"][1:] for p in run_pauses]
        summary[name] = {
            "first_run_s": statistics.median(r["walls"][0] for r in results),
            "later_runs_median_s": statistics.median(w for r in results for w in r["walls"][1:]) if args.runs > 1 else None,
            "full_collections_first_run": statistics.mean(len(r["pauses"][0]) for r in results),
            "full_collections_per_later_run": len(later) / max(1, len(results) * (args.runs - 1)),
            "pause_median_ms": 1e3 * statistics.median(pauses) if pauses else 0.0,
            "pause_max_ms": 1e3 * max(pauses, default=0.0),
        }
    print("\nsetting      first run   later runs (median)   full collections: first run / per later run   pause median / max")
    for name, s in summary.items():
        later_s = f"{s['later_runs_median_s']:.2f} s" if s["later_runs_median_s"] is not None else "-"
        print(
            f"{name:>10}   {s['first_run_s']:7.2f} s   {later_s:>12}   "
            f"{s['full_collections_first_run']:.1f} / {s['full_collections_per_later_run']:.2f}   "
            f"{s['pause_median_ms']:.0f} / {s['pause_max_ms']:.0f} ms"
        )
    write_results(args.out, args, children=children, summary=summary)


if __name__ == "__main__":
    main()
