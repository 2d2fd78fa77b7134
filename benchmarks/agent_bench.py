"""Agent-shaped speed on the real Gemma 3 270M: warm vs cold prefix on a multi-turn trace, and four
concurrent streams, beside transformers `generate` in the same run.

1. Agent trace: turn 1 and turn 2 of the workloads' agent trace (benchmarks/workloads.jsonl), with a system prompt that
   carries reference notes and tool declarations (1,000+ tokens, as real agent prompts do).
   Time to first token of turn 2: cold (fresh engine state), warm (after turn 1 ran, so the
   shared prefix is in the prefix cache), and HF generate (which recomputes everything).
2. Four concurrent streams (one prompt per kind) on one engine: aggregate tokens/s and the
   worst first-chunk latency, against the same four run one after another (ours and HF).

    python -m benchmarks.agent_bench --dtype bfloat16 --out benchmarks/results/agent-270m-bf16.json
    python -m benchmarks.agent_bench --dtype float32 --out benchmarks/results/agent-270m-fp32.json
    python -m benchmarks.agent_bench --repeats 1 --max-new 2     # smoke run
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import torch

from langchain_gemma_mtp.embedded import embedded_model_dir
from langchain_gemma_mtp.engine import Engine, on_short_lived_thread
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime

from .common import parser, set_threads, workloads, write_results

WORKLOADS = {w["id"]: w for w in workloads()}
CONCURRENT = ("code-fib", "prose-email", "rag-quote", "tool-weather")


def agent_trace() -> list[list[dict]]:
    """The two agent turns, their system prompt extended with the reference notes an agent carries."""
    notes = "\n\n".join(
        m["content"]
        for wid in ("rag-quote", "rag-summary", "code-edit", "code-typehints")
        for m in WORKLOADS[wid]["messages"]
        if m["role"] == "user"
    )
    turns = []
    for wid in ("agent-turn-1", "agent-turn-2"):
        messages = [dict(m) for m in WORKLOADS[wid]["messages"]]
        messages[0]["content"] += "\n\nReference notes:\n" + notes
        turns.append(messages)
    return turns


def prompt_ids(runtime: ChatRuntime, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    return runtime.prepare(ChatRequest(messages=messages, tools=tools)).prompt_ids


def first_token_secs(engine: Engine, ids: list[int], max_new: int = 1) -> tuple[float, float, int]:
    """(seconds to the first burst, seconds to the end, prompt tokens read from the prefix cache)."""
    start = time.perf_counter()
    handle = engine.submit(ids, max_new_tokens=max_new)
    first = None
    for _ in handle:
        first = first or time.perf_counter() - start
    return first, time.perf_counter() - start, handle.cached_tokens


def hf_secs(model, ids: list[int], max_new: int, min_new: int = 0) -> float:
    """Seconds of one HF generate, on a short-lived thread (on_short_lived_thread says why)."""

    @torch.inference_mode()
    def run() -> float:
        start = time.perf_counter()
        model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, min_new_tokens=min_new)
        return time.perf_counter() - start

    return on_short_lived_thread(run)


def bench_trace(engine: Engine, runtime: ChatRuntime, repeats: int, max_new: int) -> dict:
    tools = WORKLOADS["agent-turn-2"]["tools"]
    turn1, turn2 = (prompt_ids(runtime, m, tools) for m in agent_trace())
    rows = {"turn1_prompt_tokens": len(turn1), "turn2_prompt_tokens": len(turn2)}
    cold, warm, cached = [], [], []
    for _ in range(repeats):
        engine.forget()
        cold.append(first_token_secs(engine, turn2)[0])
        engine.forget()
        first_token_secs(engine, turn1, max_new)  # the agent's first step
        secs, _, reused = first_token_secs(engine, turn2)
        warm.append(secs)
        cached.append(reused)
    hf = [hf_secs(engine.model, turn2, 1) for _ in range(repeats)]
    rows.update(
        cold_ttft=statistics.median(cold), warm_ttft=statistics.median(warm), hf_ttft=statistics.median(hf), warm_cached_tokens=cached[-1]
    )
    rows["warm_over_cold"] = rows["warm_ttft"] / rows["cold_ttft"]
    return rows


def run_streams(engine: Engine, prompts: list[list[int]], max_new: int, concurrent: bool) -> dict:
    """First-chunk latency per stream (from when all were asked for) and aggregate tokens/s."""
    engine.forget()
    start = time.perf_counter()
    firsts, tokens = [0.0] * len(prompts), [0] * len(prompts)

    def consume(i: int, handle) -> None:
        for burst in handle:
            firsts[i] = firsts[i] or time.perf_counter() - start
            tokens[i] += len(burst.token_ids)

    if concurrent:
        handles = [engine.submit(ids, max_new_tokens=max_new, stop_token_ids=[]) for ids in prompts]
        threads = [threading.Thread(target=consume, args=(i, h)) for i, h in enumerate(handles)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, ids in enumerate(prompts):
            consume(i, engine.submit(ids, max_new_tokens=max_new, stop_token_ids=[]))
    wall = time.perf_counter() - start
    return dict(wall=wall, tok_s=sum(tokens) / wall, worst_first=max(firsts), first=firsts, tokens=sum(tokens))


def hf_streams(model, prompts: list[list[int]], max_new: int) -> dict:
    """HF serves one request at a time: request i's first token waits for every request before it."""
    ttft = [hf_secs(model, ids, 1) for ids in prompts]
    durations = [hf_secs(model, ids, max_new, min_new=max_new) for ids in prompts]
    firsts = [sum(durations[:i]) + ttft[i] for i in range(len(prompts))]
    wall = sum(durations)
    return dict(wall=wall, tok_s=max_new * len(prompts) / wall, worst_first=max(firsts), first=firsts, tokens=max_new * len(prompts))


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--drafter", default="ngram")
    ap.add_argument("--assistant", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=48)
    args = ap.parse_args()
    set_threads(args.threads)
    engine = Engine.from_pretrained(embedded_model_dir(), drafter=args.drafter, assistant=args.assistant, dtype=args.dtype)
    runtime = ChatRuntime(engine)
    first_token_secs(engine, prompt_ids(runtime, [{"role": "user", "content": "Hi"}]), 4)  # warm-up
    trace = bench_trace(engine, runtime, args.repeats, args.max_new)
    print(json.dumps(trace, indent=1), flush=True)
    prompts = [prompt_ids(runtime, WORKLOADS[w]["messages"], WORKLOADS[w].get("tools")) for w in CONCURRENT]
    streams = {
        "ours concurrent": run_streams(engine, prompts, args.max_new, concurrent=True),
        "ours one by one": run_streams(engine, prompts, args.max_new, concurrent=False),
        "hf one by one": hf_streams(engine.model, prompts, args.max_new),
    }
    print(f"\n## Gemma 3 270M, {args.dtype}, drafter {engine.drafter.name}, {args.threads} threads\n")
    print("| agent trace turn 2 | time to first token | vs cold |\n|---|---|---|")
    for key, label in (("cold_ttft", "ours cold"), ("warm_ttft", "ours warm (after turn 1)"), ("hf_ttft", "HF generate")):
        print(f"| {label} | {trace[key] * 1000:.0f} ms | x{trace[key] / trace['cold_ttft']:.2f} |")
    print(
        f"\nprompt tokens: turn 1 {trace['turn1_prompt_tokens']}, turn 2 {trace['turn2_prompt_tokens']} "
        f"({trace['warm_cached_tokens']} read from the prefix cache when warm)\n"
    )
    print("| 4 streams | aggregate tok/s | worst first chunk | first chunks |\n|---|---|---|---|")
    for name, r in streams.items():
        print(
            f"| {name} | {r['tok_s']:.1f} | {r['worst_first'] * 1000:.0f} ms | "
            + ", ".join(f"{f * 1000:.0f}" for f in r["first"])
            + " ms |"
        )
    write_results(args.out, args, trace=trace, streams=streams)


if __name__ == "__main__":
    main()
