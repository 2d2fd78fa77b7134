"""What a second thread that has run PyTorch CPU work costs the engine, and that two engines no longer pay it.

Every thread that runs a parallel PyTorch CPU op keeps a team of OpenMP threads; once the teams
outnumber the cores, libgomp stops spinning between ops and each op waits for its threads to wake.
Before engines shared one owner thread per device that lived only while requests did, a second
engine's idle owner thread was such a thread. In one run, interleaved rounds (the fastest kept):

- `alone`: plain decoding (no drafter) on the embedded 270M, nothing else in the process holding
  a team;
- `beside a parked thread`: the same while another thread that ran one matmul stays alive (what
  an idle second engine's thread was, or a caller's own torch thread);
- `second engine`: the same request on a second Engine over the same model, run after the first
  (with the shared, idle-ending owner thread this should equal `alone`);
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
from langchain_gemma_mtp.engine.drafters import NoDrafter

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
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    set_threads(args.threads)
    first = Engine.from_pretrained(embedded_model_dir(), drafter="none", dtype=args.dtype)
    second = Engine(first.model, NoDrafter(), first.tokenizer)
    ids = workload_prompts(first.tokenizer, {"code"})[0][2]

    def decode(engine: Engine) -> tuple[None, float]:
        engine.forget()
        start = time.perf_counter()
        result = engine.generate(ids, max_new_tokens=args.max_new)
        return None, (time.perf_counter() - start) / len(result.token_ids)

    def parked(fn):
        thread = ParkedThread()
        try:
            return fn()
        finally:
            thread.release()

    decode(first)  # warm up kernels outside the timings
    calls = {
        "alone": lambda: decode(first),
        "beside a parked thread": lambda: parked(lambda: decode(first)),
        "second engine": lambda: decode(second),
        "micro alone": lambda: (None, on_short_lived_thread(micro_seconds)),
        "micro beside a parked thread": lambda: (None, parked(lambda: on_short_lived_thread(micro_seconds))),
    }
    best = dict(zip(calls, (min(secs) for _, secs in timed_rounds(list(calls.values()), args.repeats))))
    rows = {
        name: dict(seconds=secs, vs_alone=secs / best["micro alone" if name.startswith("micro") else "alone"])
        for name, secs in best.items()
    }
    print(f"\n## Owner thread, Gemma 3 270M (embedded), {args.dtype}, {args.threads} threads, {args.max_new} new tokens\n")
    print("| setting | time | vs alone |\n|---|---|---|")
    for name, row in rows.items():
        unit = "us/op" if name.startswith("micro") else "ms/token"
        scale = 1e6 if name.startswith("micro") else 1e3
        print(f"| {name} | {row['seconds'] * scale:.1f} {unit} | x{row['vs_alone']:.2f} |")
    write_results(args.out, args, rows=rows)


if __name__ == "__main__":
    main()
