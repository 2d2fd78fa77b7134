"""The engine beside torch work of the user's own: transformers on the main thread, then our engine.

Every thread that runs a parallel PyTorch CPU op keeps a team of OpenMP threads; once the teams
outnumber the cores, libgomp stops spinning between ops and each op waits for its threads to wake.
A user's main thread that ran a model (transformers' `generate`, an embedding model) holds such a
team; a thread that calls the engine now hands its own back (engine/openmp.py). In one run,
interleaved rounds, every `ours` call made on the main thread right after transformers ran there
(so the main thread holds a team each time it calls the engine), the fastest of each kept:

- `hf greedy` / `ours none`: transformers' greedy `generate` on the main thread, then plain decoding
  (no drafter) on the embedded 270M (goal: ours at least x0.97 of it);
- `hf prompt lookup` / `ours ngram`: `generate(prompt_lookup_num_tokens=k)` on the main thread,
  then our n-gram drafter at the same k (goal: at least level);
- `ours none beside a parked thread`: plain decoding while another thread that ran one matmul
  stays alive and never calls the engine (a team the engine cannot hand back: the cost that remains);
- `second engine`: the same request on a second Engine over the same model (one shared owner thread);
- `micro`: one 640x640 bf16 matmul on one row, alone and beside the parked thread.

    python -m benchmarks.owner_thread_bench --out benchmarks/results/owner-thread-270m-bf16.json
    python -m benchmarks.owner_thread_bench --max-new 4 --repeats 1     # smoke run
"""

from __future__ import annotations

import threading
import time

import torch

from langchain_gemma_mtp.embedded import embedded_model_dir
from langchain_gemma_mtp.engine import Engine, on_short_lived_thread
from langchain_gemma_mtp.engine.drafters import NgramDrafter, NoDrafter

from .common import parser, set_threads, timed_rounds, workload_prompts, write_results


class ParkedThread:
    """A thread that ran one parallel op (so it holds an OpenMP team) and waits until released."""

    def __init__(self):
        self._release = threading.Event()
        ready = threading.Event()

        def park():
            torch.randn(256, 256) @ torch.randn(256, 256)
            ready.set()
            self._release.wait()

        self._thread = threading.Thread(target=park, daemon=True)
        self._thread.start()
        ready.wait()

    def release(self) -> None:
        self._release.set()
        self._thread.join()


def micro_seconds() -> float:
    """Seconds per op of a chain of one-row bf16 matmuls (640x640): small ops, as in decoding."""
    weights = [torch.randn(640, 640, dtype=torch.bfloat16) for _ in range(100)]
    x = torch.randn(1, 640, dtype=torch.bfloat16)
    start = time.perf_counter()
    for _ in range(20):
        y = x
        for w in weights:
            y = torch.nn.functional.linear(y, w)
    return (time.perf_counter() - start) / (20 * len(weights))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="draft length of the n-gram drafter and of prompt lookup")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    first = Engine.from_pretrained(embedded_model_dir(), drafter="none", dtype=args.dtype)
    second = Engine(first.model, NoDrafter(), first.tokenizer)
    ngram = Engine(first.model, NgramDrafter(), first.tokenizer)
    ids = workload_prompts(first.tokenizer, {"code"})[0][2]

    def hf(**kw) -> tuple[None, float]:
        """transformers' generate on the calling (main) thread, which keeps its OpenMP team after it."""
        with torch.inference_mode():
            start = time.perf_counter()
            out = first.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=args.max_new, **kw)
        return None, (time.perf_counter() - start) / (out.shape[1] - len(ids))

    def decode(engine: Engine, **kw) -> tuple[None, float]:
        engine.forget()  # a cold call, like transformers'
        start = time.perf_counter()
        result = engine.generate(ids, max_new_tokens=args.max_new, **kw)
        return None, (time.perf_counter() - start) / len(result.token_ids)

    def parked(fn):
        thread = ParkedThread()
        try:
            return fn()
        finally:
            thread.release()

    hf(), decode(first), decode(ngram, num_draft_tokens=args.k)  # warm up kernels outside the timings
    calls = {  # in this order in every round: each `ours` right after transformers ran on this thread
        "hf greedy": lambda: hf(),
        "ours none": lambda: decode(first),
        "hf prompt lookup": lambda: hf(prompt_lookup_num_tokens=args.k),
        "ours ngram": lambda: decode(ngram, num_draft_tokens=args.k),
        "ours none beside a parked thread": lambda: parked(lambda: decode(first)),
        "second engine": lambda: decode(second),
        "micro alone": lambda: (None, on_short_lived_thread(micro_seconds)),
        "micro beside a parked thread": lambda: (None, parked(lambda: on_short_lived_thread(micro_seconds))),
    }
    best = dict(zip(calls, (min(secs) for _, secs in timed_rounds(list(calls.values()), args.repeats))))
    baseline = {  # each row's speed as a ratio to this row's (speed, not time: above 1 is faster)
        "ours none": "hf greedy",
        "hf prompt lookup": "hf greedy",
        "ours ngram": "hf prompt lookup",
        "ours none beside a parked thread": "ours none",
        "second engine": "ours none",
        "micro beside a parked thread": "micro alone",
    }
    rows = {
        name: dict(seconds=secs, vs=baseline.get(name), speed_ratio=best[baseline.get(name, name)] / secs) for name, secs in best.items()
    }
    print(
        f"\n## Beside the user's torch work, Gemma 3 270M (embedded), {args.dtype}, {args.threads} threads, {args.max_new} new tokens, k={args.k}\n"
    )
    print("| setting | time | speed vs |\n|---|---|---|")
    for name, row in rows.items():
        unit, scale = ("us/op", 1e6) if name.startswith("micro") else ("ms/token", 1e3)
        vs = f"x{row['speed_ratio']:.2f} of {row['vs']}" if row["vs"] else ""
        print(f"| {name} | {row['seconds'] * scale:.1f} {unit} | {vs} |")
    write_results(args.out, args, rows=rows)


if __name__ == "__main__":
    main()
