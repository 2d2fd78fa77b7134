"""Load on `gemma-mtp serve`: N concurrent streaming clients, for each N of `--clients` (a list).

By default the script builds the memorizing tiny chat fixture (tests/chat_fixtures.py), serves it
with the real console command in a separate process on a loopback port, and runs N concurrent
streaming chat requests through httpx (SSE, `stream_options.include_usage`). Every answer is
checked against the transcript the model memorized, so "complete" means the right answer, not
just a closed stream. With `--embedded` it serves the real Gemma 3 270M instead (bf16, or `--dtype`), the
clients asking the agent workloads (benchmarks/workloads.jsonl) in turn, each answer written to
`--max-tokens`. Each level gets a fresh server, warmed up on a question no client asks. Per N it
reports aggregate throughput (completion tokens per second of wall time), first-chunk latency
percentiles (request sent -> first chunk with output) and each client's own rate (its tokens over
its requests' whole time: worst and median), and aggregate over one client's. Every level serves
the same requests (`--requests`, default the largest level's client count; the questions repeat
past the distinct ones), each client sending its next as soon as its last ended, so a level's
rate compares with one client's over the same work.

    python -m benchmarks.server_load --embedded --clients 1,4,16 --requests 16 --max-tokens 96 --rounds 3 --out benchmarks/results/server-load-270m-bf16.json
    python -m benchmarks.server_load --clients 32 --out benchmarks/results/server-load-tiny.json
    python -m benchmarks.server_load --clients 2     # smoke run
    python -m benchmarks.server_load --base-url http://127.0.0.1:8000/v1 --model NAME   # any running server
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import httpx

from .common import REPO, parser, plain_turns, workloads, write_results

# Memorized questions of the fixture with answers of different lengths; clients take them in turn.
QUESTIONS = (
    "Hello",
    "Write a Python function that adds two numbers.",
    "Write a short story about a robot who learns to paint.",
    "Write me 2 haikus. Only include the haikus.",
    "Say hello in Japanese.",
    "hi",
)


def served(threads: int, embedded: bool, drafter: str, max_concurrent: int, dtype: str = "bfloat16"):
    """The memorizing fixture, or the embedded 270M, served by `gemma-mtp serve` in a child process."""
    from langchain_gemma_mtp.server import serve_in_subprocess

    if embedded:
        from langchain_gemma_mtp.embedded import EMBEDDED_ASSISTANT_DIR, embedded_model_dir

        model = str(embedded_model_dir())
        extra = ["--dtype", dtype, "--drafter", drafter]
        if drafter in ("mtp", "hybrid"):
            extra += ["--assistant", str(EMBEDDED_ASSISTANT_DIR)]
    else:
        from tests.chat_fixtures import chat_checkpoint

        model, extra = str(chat_checkpoint()), []
    # The child serves this checkout's package, whatever is installed.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    args = ["--model", model, "--log-level", "warning", "--max-concurrent", str(max_concurrent), *extra]
    return model, serve_in_subprocess(args, env=env)


def questions(embedded: bool) -> list[tuple[str, list[dict]]]:
    """(name, messages) the clients ask in turn: the fixture's memorized questions, or the workloads as plain turns."""
    if embedded:
        return [(w["id"], plain_turns(w["messages"], w.get("tools"))) for w in workloads() if w.get("messages")]
    return [(q, [{"role": "user", "content": q}]) for q in QUESTIONS]


async def one_client(client: httpx.AsyncClient, model: str, asked: tuple[str, list[dict]], max_tokens: int, extra: dict) -> dict:
    question, messages = asked
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    started = time.perf_counter()
    first = None
    text, finish, usage = [], None, None
    async with client.stream("POST", "/chat/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"question": question, "error": f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"}
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"question": question, "error": chunk["error"]["message"]}
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", ()):
                delta = choice.get("delta") or {}
                if delta.get("content") or delta.get("tool_calls"):
                    first = first if first is not None else time.perf_counter() - started
                    text.append(delta.get("content") or "")
                finish = choice.get("finish_reason") or finish
    return {
        "question": question,
        "answer": "".join(text),
        "finish_reason": finish,
        "completion_tokens": (usage or {}).get("completion_tokens", 0),
        "first_chunk_s": first,
        "total_s": time.perf_counter() - started,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


async def run(
    base_url: str,
    model: str,
    clients: int,
    max_tokens: int,
    api_key: str | None,
    warm: tuple[str, list[dict]],
    work: list[tuple[str, list[dict]]],
    extra: dict,
) -> tuple[list[dict], float]:
    """`work`'s requests served to `clients` concurrent clients, each sending its next request as
    soon as its last one ended (the results carry which client sent each)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:
        # Warm up on a question no client asks: first-call costs stay out of the numbers, and no client
        # finds its own answer already in the n-gram index.
        await one_client(client, model, warm, max_tokens, extra)
        queue = list(reversed(work))
        results: list[dict] = []

        async def client_loop(who: int) -> None:
            while queue:
                results.append({**await one_client(client, model, queue.pop(), max_tokens, extra), "client": who})

        started = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        return results, time.perf_counter() - started


def expected_answers() -> dict[str, str] | None:
    """The fixture's memorized answers, to check every client got the right one."""
    from langchain_core.messages import HumanMessage

    from tests.chat_fixtures import transcripts

    answers = {}
    for t in transcripts():
        plain = isinstance(t.input, str) or (len(t.input) == 1 and isinstance(t.input[0], HumanMessage))
        if plain and not t.options and t.chat_template is None:
            question = t.input if isinstance(t.input, str) else t.input[0].content
            answers[question] = t.completion.removesuffix("<turn|>")
    return answers


def summarize(clients: int, results: list[dict], wall: float, expected: dict[str, str] | None) -> dict:
    """One load level's numbers (and its problems: errors, wrong answers, unfinished streams)."""
    errors = [r for r in results if "error" in r]
    wrong = [r for r in results if "error" not in r and expected and r["answer"] != expected.get(r["question"], r["answer"])]
    unfinished = [r for r in results if "error" not in r and r["finish_reason"] is None]
    done = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in done)
    firsts = [r["first_chunk_s"] for r in done if r["first_chunk_s"] is not None]
    # Each client's rate: its tokens over the time its requests took (queueing and prefill included).
    per_client: dict[int, list[float]] = {}
    for r in done:
        tokens_time = per_client.setdefault(r.get("client", 0), [0.0, 0.0])
        tokens_time[0] += r["completion_tokens"]
        tokens_time[1] += r["total_s"]
    rates = sorted(t / s for t, s in per_client.values() if s > 0)
    return {
        "clients": clients,
        "requests": len(results),
        "completed": len(done) - len(unfinished),
        "errors": len(errors),
        "wrong_answers": len(wrong),
        "problems": [{k: bad.get(k) for k in ("question", "error", "answer")} for bad in errors + wrong],
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(done) / wall, 2),
        "first_chunk_s": {
            name: round(percentile(firsts, q), 4) if firsts else None for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "client_tokens_per_s": {"worst": round(rates[0], 2), "median": round(percentile(rates, 50), 2)} if rates else None,
    }


def main() -> int:
    ap = parser(__doc__, threads=False)
    ap.add_argument("--clients", default="32", help="concurrent clients, or a comma list of levels run one after another (1,4,16,32)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=1, help="runs of every level; each level reports its median round")
    ap.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests every level serves, the clients taking the next as each ends (default: the largest level's clients)",
    )
    ap.add_argument("--embedded", action="store_true", help="serve the real Gemma 3 270M (bf16) and ask the agent workloads")
    ap.add_argument(
        "--drafter", default="hybrid", help="with --embedded: the server's drafter (hybrid: the distilled MTP drafter and n-gram)"
    )
    ap.add_argument("--dtype", default="bfloat16", help="with --embedded: the server's dtype (float32 on a CPU without native bf16)")
    ap.add_argument("--base-url", help="an already running server (default: serve the tiny fixture here)")
    ap.add_argument("--model", help="the served model name (with --base-url)")
    ap.add_argument("--api-key", default=None, help="the server's API key (never written to the results)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server this script starts")
    args = ap.parse_args()
    levels = [int(n) for n in str(args.clients).split(",")]
    asked = questions(args.embedded)
    # Every level serves the same requests (the questions in turn), so its rate compares with one
    # client's over the same work, not over whichever question one client happened to ask.
    warm, rest = asked[-1], asked[:-1]
    work = [rest[i % len(rest)] for i in range(args.requests or max(levels))]
    # The 270M's answers: every one runs to max_tokens (vLLM's `ignore_eos`, as its serving benchmark
    # does), so every level writes the same number of tokens whatever bf16 rounding a batch changes.
    extra = {"ignore_eos": True} if args.embedded else {}

    def level(base_url: str, model: str, n: int) -> tuple[int, list[dict], float]:
        return (n, *asyncio.run(run(base_url, model, n, args.max_tokens, args.api_key, warm, work, extra)))

    if args.base_url and not args.model:
        ap.error("--base-url needs --model")
    rounds: list[list[tuple[int, list[dict], float]]] = []
    for _ in range(args.rounds):  # the levels in turn, round after round, so drift hits them alike
        if args.base_url:
            rounds.append([level(args.base_url, args.model, n) for n in levels])
            continue
        # A fresh server per level: nothing one level's answers taught the n-gram index or the prefix
        # cache makes the next level's faster.
        rounds.append([])
        for n in levels:
            model, server_cm = served(args.threads, args.embedded, args.drafter, n, args.dtype)
            with server_cm as server:
                rounds[-1].append(level(server.base_url, model, n))
    expected = None if args.base_url or args.embedded else expected_answers()

    # Per level, the round with the median rate (its latencies and client rates with it).
    runs, summaries, checked = [], [], []
    for i, n in enumerate(levels):
        tried = sorted(
            ((summarize(n, results, wall, expected), (n, results, wall)) for n, results, wall in (r[i] for r in rounds)),
            key=lambda t: t[0]["tokens_per_s"],
        )
        checked += [t[0] for t in tried]
        summary, run_ = tried[(len(tried) - 1) // 2]
        summary["tokens_per_s_rounds"] = [t[0]["tokens_per_s"] for t in tried]
        summaries.append(summary)
        runs.append(run_)
    one = next((s for s in summaries if s["clients"] == 1), None)
    for s in summaries:
        if one:
            s["aggregate_over_one_client"] = round(s["tokens_per_s"] / one["tokens_per_s"], 2)
        rates = s["client_tokens_per_s"] or {}
        print(
            f"{s['clients']:>3} clients: {s['completed']}/{s['requests']} requests completed, {s['errors']} errors, {s['wrong_answers']} wrong; "
            f"{s['tokens_per_s']} tok/s ({s.get('aggregate_over_one_client', '-')}x one client); first chunk p50 "
            f"{s['first_chunk_s']['p50']} s p99 {s['first_chunk_s']['p99']} s; per client worst {rates.get('worst')} median {rates.get('median')} tok/s"
        )
        for bad in s["problems"]:
            print("  problem:", bad)
    write_results(args.out, args, summary=summaries, requests=[r for _, results, _ in runs for r in results])
    ok = all(not s["errors"] and not s["wrong_answers"] and s["completed"] == s["requests"] == len(work) for s in checked)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
