"""Parallel agents sharing forwards, on the real Gemma 3 270M: a LangGraph fan-out, a long prompt
arriving beside streams, and a level of many requests arriving together.

1. Fan-out: a LangGraph graph sends one task to 4 branch nodes at once (`Send`), each a
   ChatGemmaMTP call with its own draft hint writing `--max-new` tokens. Aggregate tokens/s of the
   fan-out against the same 4 nodes run one after another on the same engine, in interleaved
   rounds (same process, same engine, same prompts), each run cold (nothing learned from the
   runs before).
2. Prefill beside streams: three requests stream while a prompt of `--long-prompt` tokens arrives.
   The longest gap between two bursts of a streaming request while the long prompt prefills
   (chunked, engine/loop.py PREFILL_CHUNK), against their median gap, and against the long
   prompt's whole prefill time (what the gap would be without chunking).
3. A level: the first `--level` workload prompts (the server benchmark's 16 requests) submitted at
   once, against the same requests one after another on the same engine, both cold, in
   interleaved rounds. From each request's bursts, the fastest level's three phases: the ramp
   (until the last request's first burst), all of them streaming (until the first one ends) and
   the tail; the middle one's rate is what a steady batch of that many requests runs.

    python -m benchmarks.batch_bench --out benchmarks/results/batch-270m-bf16.json
    python -m benchmarks.batch_bench --drafter hybrid --out benchmarks/results/batch-270m-bf16-hybrid.json
    python -m benchmarks.batch_bench --rounds 1 --max-new 8 --long-prompt 300 --level 4     # smoke run
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import statistics
import threading
import time
from typing import Annotated

from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from typing_extensions import TypedDict

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.embedded import EMBEDDED_ASSISTANT_DIR, embedded_model_dir
from langchain_gemma_mtp.engine import Engine

from .common import parser, set_threads, timed_rounds, workload_prompts, workloads, write_results

# The four branches: a hint each, and the workload whose user message is the branch's task.
BRANCHES = (("code", "code-fib"), ("prose", "prose-email"), ("tool_call", "tool-weather"), ("long_form", "rag-summary"))


class FanState(TypedDict):
    task: str
    results: Annotated[list[tuple[str, int]], operator.add]


class BranchState(TypedDict):
    hint: str
    prompt: str


def fan_out_graph(llm: ChatGemmaMTP, max_new: int):
    """START -> 4 branches at once (Send) -> END; each branch is one model call with its own hint."""

    def dispatch(state: FanState) -> list[Send]:
        return [Send("branch", {"hint": hint, "prompt": text}) for hint, text in branch_prompts()]

    def branch(state: BranchState) -> dict:
        reply = llm.invoke(
            [SystemMessage("Answer the request."), HumanMessage(state["prompt"])], draft_hint=state["hint"], max_tokens=max_new
        )
        return {"results": [(state["hint"], reply.usage_metadata["output_tokens"] if reply.usage_metadata else 0)]}

    graph = StateGraph(FanState)
    graph.add_node("branch", branch)
    graph.add_conditional_edges(START, dispatch, ["branch"])
    graph.add_edge("branch", END)
    return graph.compile()


def branch_prompts() -> list[tuple[str, str]]:
    by_id = {w["id"]: w for w in workloads()}
    return [(hint, next(m["content"] for m in by_id[wid]["messages"] if m["role"] == "user")) for hint, wid in BRANCHES]


def bench_fan_out(llm: ChatGemmaMTP, engine: Engine, max_new: int, rounds: int) -> dict:
    graph = fan_out_graph(llm, max_new)
    prompts = branch_prompts()

    # Each run starts cold (engine.forget()): no n-gram index or prefix cache from the runs before,
    # which would let n-gram drafting copy the previous run's answers.
    def fan() -> tuple[int, float]:
        engine.forget()
        start = time.perf_counter()
        out = graph.invoke({"task": "write", "results": []})
        return sum(n for _, n in out["results"]), time.perf_counter() - start

    def sequential() -> tuple[int, float]:
        engine.forget()
        start = time.perf_counter()
        tokens = 0
        for hint, text in prompts:  # the same node calls, one after another
            reply = llm.invoke([SystemMessage("Answer the request."), HumanMessage(text)], draft_hint=hint, max_tokens=max_new)
            tokens += reply.usage_metadata["output_tokens"] if reply.usage_metadata else 0
        return tokens, time.perf_counter() - start

    fan(), sequential()  # warm-up
    (fan_tokens, fan_secs), (seq_tokens, seq_secs) = timed_rounds([fan, sequential], rounds)
    fan_rate, seq_rate = fan_tokens / min(fan_secs), seq_tokens / min(seq_secs)
    return {
        "branches": len(prompts),
        "fan_out_tokens": fan_tokens,
        "sequential_tokens": seq_tokens,
        "fan_out_s": fan_secs,
        "sequential_s": seq_secs,
        "fan_out_tok_s": round(fan_rate, 1),
        "sequential_tok_s": round(seq_rate, 1),
        "fan_out_over_sequential": round(fan_rate / seq_rate, 2),
    }


def bench_prefill_beside_streams(engine: Engine, long_prompt: int, max_new: int) -> dict:
    """Burst gaps of three streams while a long prompt prefills, and that prompt's prefill time alone."""
    by_id = {w["id"]: w for w in workloads()}
    tok = engine.tokenizer
    short = [tok.encode(next(m["content"] for m in by_id[w]["messages"] if m["role"] == "user")) for _, w in BRANCHES[:3]]
    filler = tok.encode(" ".join(m["content"] for w in by_id.values() for m in w.get("messages", []) if m.get("content")))
    long_ids = (filler * (long_prompt // max(1, len(filler)) + 1))[:long_prompt]
    engine.forget()
    alone = time.perf_counter()
    engine.generate(long_ids, max_new_tokens=1)
    prefill_alone = time.perf_counter() - alone
    engine.forget()
    stamps: list[list[float]] = [[] for _ in short]
    handles = [engine.submit(ids, max_new_tokens=max_new * 4, stop_token_ids=[]) for ids in short]

    def consume(i: int) -> None:
        for _ in handles[i]:
            stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(short))]
    for t in threads:
        t.start()
    while min(len(s) for s in stamps) < 4:  # the streams are running
        time.sleep(0.005)
    arrived = time.perf_counter()
    long = engine.submit(long_ids, max_new_tokens=1)
    next(iter(long))
    first_long = time.perf_counter()
    for h in handles:
        h.cancel()
    for t in threads:
        t.join()
    gaps_during = [b - a for s in stamps for a, b in itertools.pairwise(s) if b > arrived and a < first_long]
    gaps_before = [b - a for s in stamps for a, b in itertools.pairwise(s) if b <= arrived]
    return {
        "long_prompt_tokens": len(long_ids),
        "prefill_alone_s": round(prefill_alone, 3),
        "long_first_token_beside_streams_s": round(first_long - arrived, 3),
        "stream_gap_median_before_s": round(statistics.median(gaps_before), 4) if gaps_before else None,
        "stream_gap_max_during_prefill_s": round(max(gaps_during), 4) if gaps_during else None,
    }


def bench_level(engine: Engine, requests: int, max_new: int, rounds: int) -> dict:
    """A level of `requests` prompts submitted at once against the same one after another, and the
    fastest level's phases (module docstring, 3)."""
    prompts = [ids for _, _, ids in workload_prompts(engine.tokenizer)][:requests]

    async def stream_all() -> list[list[tuple[float, int]]]:
        handles = [engine.submit(ids, max_new_tokens=max_new, stop_token_ids=[]) for ids in prompts]

        async def stamps(handle) -> list[tuple[float, int]]:
            return [(time.perf_counter(), len(burst.token_ids)) async for burst in handle]

        return list(await asyncio.gather(*(stamps(h) for h in handles)))

    def together() -> tuple[list[list[tuple[float, int]]], float]:
        engine.forget()
        start = time.perf_counter()
        bursts = asyncio.run(stream_all())
        return [[(t - start, n) for t, n in b] for b in bursts], time.perf_counter() - start

    def one_after_another() -> tuple[int, float]:
        engine.forget()
        start = time.perf_counter()
        tokens = sum(len(engine.generate(ids, max_new_tokens=max_new, stop_token_ids=[]).token_ids) for ids in prompts)
        return tokens, time.perf_counter() - start

    together(), one_after_another()  # warm-up
    levels, seq = [], []
    for _ in range(rounds):  # interleaved, as timed_rounds, keeping every level's bursts
        levels.append(together())
        seq.append(one_after_another())
    bursts, level_secs = min(levels, key=operator.itemgetter(1))
    seq_tokens, seq_secs = min(seq, key=operator.itemgetter(1))
    tokens = sum(n for b in bursts for _, n in b)
    ramp_end = max(b[0][0] for b in bursts)  # every request has had its first burst
    tail_start = min(b[-1][0] for b in bursts)  # the first request has ended
    steady = sum(n for b in bursts for t, n in b if ramp_end < t <= tail_start)
    seq_rate = seq_tokens / seq_secs
    steady_rate = steady / (tail_start - ramp_end) if tail_start > ramp_end else None
    return {
        "requests": len(prompts),
        "tokens": tokens,
        "level_s": [round(x, 3) for _, x in levels],
        "one_after_another_s": [round(x, 3) for _, x in seq],
        "level_tok_s": round(tokens / level_secs, 1),
        "one_after_another_tok_s": round(seq_rate, 1),
        "level_over_one_after_another": round(tokens / level_secs / seq_rate, 2),
        "ramp_s": round(ramp_end, 3),
        "all_streaming_s": round(max(0.0, tail_start - ramp_end), 3),
        "all_streaming_tok_s": round(steady_rate, 1) if steady_rate else None,
        "all_streaming_over_one_after_another": round(steady_rate / seq_rate, 2) if steady_rate else None,
        "tail_s": round(level_secs - max(ramp_end, tail_start), 3),
    }


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--drafter", default="ngram", help="ngram, hybrid or mtp (the distilled drafter)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--long-prompt", type=int, default=2000)
    ap.add_argument("--level", type=int, default=16, help="requests in the level (the first N workloads)")
    args = ap.parse_args()
    set_threads(args.threads)
    assistant = str(EMBEDDED_ASSISTANT_DIR) if args.drafter in ("mtp", "hybrid") else None
    engine = Engine.from_pretrained(str(embedded_model_dir()), drafter=args.drafter, assistant=assistant, dtype=args.dtype)
    llm = ChatGemmaMTP(engine=engine, max_tokens=args.max_new)
    fan = bench_fan_out(llm, engine, args.max_new, args.rounds)
    print(
        f"fan-out of {fan['branches']}: {fan['fan_out_tok_s']} tok/s vs one after another {fan['sequential_tok_s']} tok/s "
        f"= {fan['fan_out_over_sequential']}x"
    )
    prefill = bench_prefill_beside_streams(engine, args.long_prompt, args.max_new)
    print(
        f"a {prefill['long_prompt_tokens']}-token prompt beside 3 streams: streams' longest gap {prefill['stream_gap_max_during_prefill_s']} s "
        f"(median before {prefill['stream_gap_median_before_s']} s; its prefill alone {prefill['prefill_alone_s']} s)"
    )
    level = bench_level(engine, args.level, args.max_new, args.rounds)
    print(
        f"{level['requests']} requests at once: {level['level_tok_s']} tok/s = {level['level_over_one_after_another']}x one after another; "
        f"ramp {level['ramp_s']} s, all streaming {level['all_streaming_s']} s at {level['all_streaming_over_one_after_another']}x, "
        f"tail {level['tail_s']} s"
    )
    write_results(args.out, args, fan_out=fan, prefill_beside_streams=prefill, level=level)


if __name__ == "__main__":
    main()
