"""A bounded fuzz run against `gemma-mtp serve` on loopback: a few hundred random and malformed requests
(`langchain_gemma_mtp.testing.fuzz`: wrong types at every level, deep nesting, huge strings,
invalid UTF-8, random headers, methods and paths, clients that hang up or stop reading mid-stream).
No answer may be a 5xx or take longer than the timeout; the server must be healthy after, and a good
request must still get its memorized answer. `python -m benchmarks.server_fuzz` is the longer run.
"""

from __future__ import annotations

import itertools

import httpx
import pytest
from chat_fixtures import chat_checkpoint

from langchain_gemma_mtp.server import ServerSettings, load_runtime, running_server
from langchain_gemma_mtp.testing.fuzz import failures, fuzz_cases, send

NAME = "tiny-chat"
HELLO_ANSWER = "Hello! How can I help you today?"
CASES = 300
TIMEOUT_S = 30.0  # per request: a slower answer is a hang


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(NAME, max_tokens_limit=16, max_body_bytes=1_000_000)
    with running_server(load_runtime(str(chat_checkpoint())), settings) as local:
        yield local


def _hello(server) -> str:
    reply = httpx.post(
        f"{server.base_url}/chat/completions",
        timeout=TIMEOUT_S,
        json={"model": NAME, "messages": [{"role": "user", "content": "Hello"}], "temperature": 0},
    )
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("seed", [0, 1])
def test_random_and_malformed_requests_get_no_5xx_and_no_hang_and_the_server_keeps_serving(server, seed) -> None:
    outcomes = [send(case, server.url, TIMEOUT_S) for case in itertools.islice(fuzz_cases(seed, NAME, max_tokens=4), CASES // 2)]
    assert not failures(outcomes), "\n".join(failures(outcomes))
    statuses = {o.status for o in outcomes}
    assert {200, 400, 404, 405} <= statuses  # the run really reached the model and every kind of check
    assert sum(o.status == 400 for o in outcomes) > CASES // 4
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert _hello(server) == HELLO_ANSWER
