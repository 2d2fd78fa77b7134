"""libgomp's spin count, on an idle machine and with another busy torch process on the same cores.

Between two parallel ops each OpenMP thread of PyTorch's CPU build spins before it sleeps:
300,000 turns by default (`GOMP_SPINCOUNT`, read once when libgomp loads, i.e. at `import torch`).
A decode step is hundreds of small ops, so on an idle machine the spin keeps the team hot; on cores
another busy process also uses, the spinning threads take the time slices the working threads need.
Each setting runs in a fresh child process (the setting must be in place before torch loads): the
embedded 270M (bf16, 2 threads) decodes `--prompts` workload prompts with n-gram drafting, greedy,
`--max-new` tokens each, after a warm-up; reported in tokens/s. "busy": a second child keeps the
cores working meanwhile (`--load torch`: a torch process of its own running small matmuls on 2
threads with the default spin, as another agent's model would; `--load cpu`: two pure-Python busy
loops, as a compiler or a test run would). Settings and loads interleave over `--rounds`; the
best of each is kept.

    python -m benchmarks.spin_bench --out benchmarks/results/spin-270m-bf16.json
    python -m benchmarks.spin_bench --settings default 10000 --rounds 1 --max-new 8 --prompts 1     # smoke run
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .common import REPO, parser, write_results

SETTINGS = ("default", "100000", "30000", "10000", "1000", "passive")


def child_env(setting: str) -> dict[str, str]:
    """The environment of a child process running with `setting` ("default": nothing set;
    "passive": OMP_WAIT_POLICY=PASSIVE; a number: GOMP_SPINCOUNT)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif setting != "default":
        env["GOMP_SPINCOUNT"] = setting
    return env


def decode(prompts: int, max_new: int, threads: int) -> None:
    """The child: decode and print tokens/s as JSON."""
    from benchmarks.common import set_threads, workload_prompts
    from langchain_gemma_mtp.embedded import embedded_model_dir
    from langchain_gemma_mtp.engine import Engine

    set_threads(threads)
    engine = Engine.from_pretrained(str(embedded_model_dir()), drafter="ngram", dtype="bfloat16")
    chosen = [ids for _, _, ids in workload_prompts(engine.tokenizer)][:prompts]
    engine.generate(chosen[-1], max_new_tokens=8, stop_token_ids=[])  # warm-up
    engine.forget()
    start, tokens = time.perf_counter(), 0
    for ids in chosen:
        tokens += len(engine.generate(ids, max_new_tokens=max_new, stop_token_ids=[]).token_ids)
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}))


def load(kind: str) -> None:
    """The busy neighbour: runs until killed."""
    if kind == "torch":
        import torch

        torch.set_num_threads(2)
        a = torch.randn(256, 256)
        while True:
            a = torch.tanh(a @ a)
    while True:
        pass


def neighbours(kind: str) -> list[subprocess.Popen]:
    """The busy processes of a `kind` load: one torch process, or two Python loops."""
    count = 1 if kind == "torch" else 2
    return [
        subprocess.Popen([sys.executable, "-m", "benchmarks.spin_bench", "--as-load", kind], cwd=REPO, env=child_env("default"))
        for _ in range(count)
    ]


def run(setting: str, busy: str | None, args) -> float:
    """Tokens/s of one child decoding with `setting`, beside a `busy` load (None: idle)."""
    others = neighbours(busy) if busy else []
    try:
        if others:
            time.sleep(2.0)  # the neighbours are up and busy
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.spin_bench", "--as-child", str(args.prompts), str(args.max_new), str(args.threads)],
            cwd=REPO,
            env=child_env(setting),
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for p in others:
            p.kill()
            p.wait()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens"] / result["seconds"]


def main() -> None:
    if sys.argv[1:2] == ["--as-child"]:
        decode(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
        return
    if sys.argv[1:2] == ["--as-load"]:
        load(sys.argv[2])
        return
    ap = parser(__doc__)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), help="default, passive or GOMP_SPINCOUNT values")
    ap.add_argument("--load", default="torch", choices=["torch", "cpu"], help="what keeps the cores busy in the busy runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-new", type=int, default=96)
    args = ap.parse_args()
    rates: dict[str, dict[str, list[float]]] = {s: {"idle": [], "busy": []} for s in args.settings}
    for _ in range(args.rounds):
        for setting in args.settings:
            for state, busy in (("idle", None), ("busy", args.load)):
                rate = run(setting, busy, args)
                rates[setting][state].append(rate)
                print(f"{setting:>8} {state}: {rate:.1f} tok/s", flush=True)
    best = {s: {state: max(v) for state, v in r.items()} for s, r in rates.items()}
    base = best.get("default")
    print("\nsetting   idle tok/s   busy tok/s" + ("   idle / default   busy / default" if base else ""))
    for s, b in best.items():
        ratios = f"   x{b['idle'] / base['idle']:.2f}            x{b['busy'] / base['busy']:.2f}" if base else ""
        print(f"{s:>8}   {b['idle']:9.1f}   {b['busy']:9.1f}{ratios}")
    write_results(args.out, args, rates=rates, best=best)


if __name__ == "__main__":
    main()
