"""Load on `gemma-mtp serve`: N concurrent streaming clients, each with its own memorized question.

By default the script builds the memorizing tiny chat fixture (tests/chat_fixtures.py), serves it
with the real console command in a separate process on a loopback port, and runs `--clients`
concurrent streaming chat requests through httpx (SSE, `stream_options.include_usage`). Every
answer is checked against the transcript the model memorized, so "complete" means the right
answer, not just a closed stream. It reports aggregate throughput (completion tokens per second
of wall time, requests per second) and first-chunk latency percentiles (request sent -> first
chunk with output), and writes them as JSON.

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

from .common import REPO, parser, write_results

# Memorized questions of the fixture with answers of different lengths; clients take them in turn.
QUESTIONS = (
    "Hello",
    "Write a Python function that adds two numbers.",
    "Write a short story about a robot who learns to paint.",
    "Write me 2 haikus. Only include the haikus.",
    "Say hello in Japanese.",
    "hi",
)


def served_fixture(threads: int):
    """The memorizing fixture served by `gemma-mtp serve` in a child process."""
    from langchain_gemma_mtp.server import serve_in_subprocess
    from tests.chat_fixtures import chat_checkpoint

    model = str(chat_checkpoint())
    # The child serves this checkout's package, whatever is installed.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    return model, serve_in_subprocess(["--model", model, "--log-level", "warning"], env=env)


async def one_client(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
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


async def run(base_url: str, model: str, clients: int, max_tokens: int, api_key: str | None) -> tuple[list[dict], float]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=600, limits=limits) as client:
        await one_client(client, model, QUESTIONS[0], max_tokens)  # warm up: first-call costs stay out of the numbers
        started = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, model, QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(clients)))
        return list(results), time.perf_counter() - started


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


def main() -> int:
    ap = parser(__doc__, threads=False)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--base-url", help="an already running server (default: serve the tiny fixture here)")
    ap.add_argument("--model", help="the served model name (with --base-url)")
    ap.add_argument("--api-key", default=None, help="the server's API key (never written to the results)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server this script starts")
    args = ap.parse_args()

    if args.base_url:
        if not args.model:
            ap.error("--base-url needs --model")
        results, wall = asyncio.run(run(args.base_url, args.model, args.clients, args.max_tokens, args.api_key))
        expected = None
    else:
        model, served = served_fixture(args.threads)
        with served as server:
            results, wall = asyncio.run(run(server.base_url, model, args.clients, args.max_tokens, args.api_key))
        expected = expected_answers()

    errors = [r for r in results if "error" in r]
    wrong = [r for r in results if "error" not in r and expected and r["answer"] != expected.get(r["question"], r["answer"])]
    unfinished = [r for r in results if "error" not in r and r["finish_reason"] is None]
    done = [r for r in results if "error" not in r]
    tokens = sum(r["completion_tokens"] for r in done)
    firsts = [r["first_chunk_s"] for r in done if r["first_chunk_s"] is not None]
    summary = {
        "clients": args.clients,
        "completed": len(done) - len(unfinished),
        "errors": len(errors),
        "wrong_answers": len(wrong),
        "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(done) / wall, 2),
        "first_chunk_s": {
            name: round(percentile(firsts, q), 4) if firsts else None for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
    }
    print(
        f"{summary['completed']}/{args.clients} streams completed, {len(errors)} errors, {len(wrong)} wrong answers in {wall:.2f}s\n"
        f"throughput: {summary['tokens_per_s']} completion tokens/s, {summary['requests_per_s']} requests/s\n"
        "first chunk latency (s): " + ", ".join(f"{k} {v}" for k, v in summary["first_chunk_s"].items())
    )
    for bad in errors + wrong:
        print("  problem:", {k: bad.get(k) for k in ("question", "error", "answer")})
    write_results(args.out, args, summary=summary, requests=results)
    ok = not errors and not wrong and not unfinished
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
