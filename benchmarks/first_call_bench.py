"""A new process's first call: ours right after loading and after a pause, against transformers' first `generate`.

Each setting runs in a fresh child process on the embedded 270M (`--dtype`, default float32; 2
threads): load, wait `idle` seconds, then time the first call and a second one on another prompt
(`--max-new` tokens of greedy decoding, n-gram drafting, each after `engine.forget()`). What the
first call pays beyond later ones is the process's one-off work: kernel-form trials and, in
float32 on CPU, the wait for the greedy screen's fp16 copy of the head, which loading packs in the
background (engine/target.py `pack_screen`), so a pause between loading and the first call hides
it. The anchor is transformers' own first greedy `generate` in a fresh process, on the same
prompts and model. Settings alternate over `--rounds` children; medians are reported.

    python -m benchmarks.first_call_bench --out benchmarks/results/first-call-270m-fp32.json
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from .common import REPO, parser, write_results

SETTINGS = {"ours, called at once": ("ours", 0.0), "ours, called after 5 s": ("ours", 5.0), "transformers generate": ("hf", 0.0)}


def child(side: str, idle: float, max_new: int, dtype: str, threads: int) -> None:
    """The child: load, pause, two timed calls; prints their seconds as JSON."""
    import torch

    from benchmarks.common import set_threads, workload_prompts
    from langchain_gemma_mtp.embedded import embedded_model_dir
    from langchain_gemma_mtp.engine import Engine

    set_threads(threads)
    engine = Engine.from_pretrained(str(embedded_model_dir()), drafter="ngram", dtype=dtype)
    prompts = [ids for _, _, ids in workload_prompts(engine.tokenizer)][:2]
    time.sleep(idle)
    seconds = []
    for ids in prompts:
        engine.forget()
        start = time.perf_counter()
        if side == "ours":
            engine.generate(ids, max_new_tokens=max_new, stop_token_ids=[])
        else:
            with torch.inference_mode():
                engine.model.generate(torch.tensor([ids]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
        seconds.append(time.perf_counter() - start)
    print(json.dumps(seconds))


def main() -> None:
    if sys.argv[1:2] == ["--as-child"]:
        side, idle, max_new, dtype, threads = sys.argv[2:7]
        child(side, float(idle), int(max_new), dtype, int(threads))
        return
    ap = parser(__doc__)
    ap.add_argument("--rounds", type=int, default=3, help="child processes per setting, alternating")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    runs: dict[str, list[list[float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, (side, idle) in SETTINGS.items():
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.first_call_bench",
                "--as-child",
                side,
                str(idle),
                str(args.max_new),
                args.dtype,
                str(args.threads),
            ]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: {runs[name][-1]}", flush=True)
    anchor = statistics.median(r[0] for r in runs["transformers generate"])
    summary = {
        name: {
            "first_call_s": statistics.median(r[0] for r in results),
            "second_call_s": statistics.median(r[1] for r in results),
            "first_call_speedup_over_transformers_first": anchor / statistics.median(r[0] for r in results),
        }
        for name, results in runs.items()
    }
    print("\nsetting                   first call   second call   first call's speed vs transformers' first")
    for name, s in summary.items():
        print(
            f"{name:<24} {s['first_call_s']:9.2f} s {s['second_call_s']:11.2f} s   x{s['first_call_speedup_over_transformers_first']:.2f}"
        )
    write_results(args.out, args, runs=runs, summary=summary)


if __name__ == "__main__":
    main()
