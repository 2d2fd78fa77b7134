"""The long fuzz run of `gemma-mtp serve`: random and malformed requests until a count or a time is reached.

By default the script serves the memorizing tiny chat fixture (tests/chat_fixtures.py) with the real
console command in a child process on a loopback port, with small --max-concurrent/--max-queued so
that concurrent senders meet the 429 path too, and sends `langchain_gemma_mtp.testing.fuzz` cases
from --workers threads. It fails (exit 1) on any 5xx, any answer slower than --timeout (a hang), an
unhealthy server after the run, or a good request that no longer gets its memorized answer. It
talks to loopback servers only. The suite runs a short version (tests/integration/test_server_fuzz.py).

    python -m benchmarks.server_fuzz --count 5000 --seconds 600 --workers 4 --out benchmarks/results/server-fuzz-tiny.json
    python -m benchmarks.server_fuzz --base-url http://127.0.0.1:8000 --model NAME   # a server already running here
"""

from __future__ import annotations

import collections
import itertools
import os
import sys
import threading
import time
from urllib.parse import urlsplit

import httpx

from langchain_gemma_mtp.testing.fuzz import FuzzOutcome, failures, fuzz_cases, send

from .common import REPO, parser, write_results

HELLO_ANSWER = "Hello! How can I help you today?"  # the fixture's memorized answer to "Hello"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def fuzz(url: str, model: str, count: int, seconds: float, workers: int, seed: int, timeout: float, max_tokens: int) -> list[FuzzOutcome]:
    """Send up to `count` cases in up to `seconds`, from `workers` threads (each its own seeded stream)."""
    deadline = time.monotonic() + seconds
    outcomes: list[FuzzOutcome] = []
    lock = threading.Lock()
    left = itertools.count()

    def worker(index: int) -> None:
        for case in fuzz_cases(seed + index, model, max_tokens):
            if next(left) >= count or time.monotonic() > deadline:
                return
            outcome = send(case, url, timeout)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def after_checks(url: str, model: str, timeout: float, expected: str | None) -> list[str]:
    """The server is healthy and a good request is still answered (with `expected`, when known)."""
    problems = []
    if httpx.get(f"{url}/health", timeout=timeout).status_code != 200:
        problems.append("/health is not 200 after the run")
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
    if reply.status_code != 200:
        problems.append(f"a good request got {reply.status_code}: {reply.text[:200]}")
    elif expected is not None and reply.json()["choices"][0]["message"]["content"] != expected:
        problems.append(f"a good request got a wrong answer: {reply.json()['choices'][0]['message']['content']!r}")
    return problems


def main() -> int:
    ap = parser(__doc__)
    ap.add_argument("--count", type=int, default=2000, help="most cases to send")
    ap.add_argument("--seconds", type=float, default=300, help="most seconds to send for")
    ap.add_argument("--workers", type=int, default=4, help="threads sending at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60, help="seconds an answer may take before it counts as a hang")
    ap.add_argument("--max-tokens", type=int, default=8, help="max_tokens of the good requests among the cases")
    ap.add_argument("--base-url", help="a server already running on loopback (default: serve the tiny fixture here)")
    ap.add_argument("--model", help="the served model name (with --base-url)")
    args = ap.parse_args()

    started = time.perf_counter()
    if args.base_url:
        if urlsplit(args.base_url).hostname not in LOOPBACK or not args.model:
            ap.error("--base-url must be a loopback URL (http://127.0.0.1:PORT) and needs --model")
        url = args.base_url.removesuffix("/").removesuffix("/v1")
        outcomes = fuzz(url, args.model, args.count, args.seconds, args.workers, args.seed, args.timeout, args.max_tokens)
        problems = failures(outcomes) + after_checks(url, args.model, args.timeout, None)
    else:
        from langchain_gemma_mtp.server import serve_in_subprocess
        from tests.chat_fixtures import chat_checkpoint

        model = str(chat_checkpoint())
        # The child serves this checkout's package, whatever is installed.
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
        serve_args = [
            "--model",
            model,
            "--log-level",
            "critical",
            "--max-tokens-limit",
            "64",
            "--max-concurrent",
            "2",
            "--max-queued",
            "2",
            "--max-body-bytes",
            "1000000",
        ]
        with serve_in_subprocess(serve_args, env=env) as server:
            outcomes = fuzz(server.url, model, args.count, args.seconds, args.workers, args.seed, args.timeout, args.max_tokens)
            problems = failures(outcomes) + after_checks(server.url, model, args.timeout, HELLO_ANSWER)
    wall = time.perf_counter() - started

    statuses = collections.Counter(str(o.status) for o in outcomes)
    kinds = collections.Counter(o.case.kind for o in outcomes)
    slowest = max((o.seconds for o in outcomes), default=0.0)
    print(f"{len(outcomes)} cases in {wall:.1f} s, slowest answer {slowest:.2f} s")
    print("statuses:", dict(sorted(statuses.items())))
    print("kinds:", dict(sorted(kinds.items())))
    for problem in problems:
        print("PROBLEM:", problem)
    print("OK" if not problems else f"{len(problems)} problems")
    write_results(
        args.out,
        args,
        cases=len(outcomes),
        wall_s=round(wall, 2),
        slowest_s=round(slowest, 3),
        statuses=dict(statuses),
        kinds=dict(kinds),
        problems=problems,
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
