"""`gemma-mtp serve`'s bounds on loopback: requests past the running and queued caps get a 429 with
Retry-After at once, a request whose KV cache could never fit is a 400 naming the limit and the fix,
and one that does not fit now waits for the running one and is then answered.

The model is an untrained tiny Gemma 4 with the fixture tokenizer: it babbles until max_tokens.
"""

from __future__ import annotations

import asyncio
import re
import threading

import httpx
import openai
import pytest
from chat_fixtures import TOKENIZER_DIR, build_target
from transformers import AutoTokenizer

from langchain_gemma_mtp import ChatGemmaMTP
from langchain_gemma_mtp.engine import Engine
from langchain_gemma_mtp.engine.drafters import NoDrafter
from langchain_gemma_mtp.engine.memory import HEADROOM, MB
from langchain_gemma_mtp.errors import KVCacheLimitError, ServerBusyError
from langchain_gemma_mtp.runtime import ChatRequest, ChatRuntime
from langchain_gemma_mtp.server import ServerSettings, running_server

NAME = "tiny-babbler"


def _body(max_tokens: int, stream: bool = False) -> dict:
    return {
        "model": NAME,
        "messages": [{"role": "user", "content": "xyz abc"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }


def _metric(url: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", httpx.get(f"{url}/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


@pytest.fixture(scope="module")
def runtime() -> ChatRuntime:
    engine = Engine(build_target(seed=5), NoDrafter(), AutoTokenizer.from_pretrained(TOKENIZER_DIR), name=NAME)
    return ChatRuntime(engine)


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the server never reached the expected state")


def test_past_the_running_and_queued_caps_a_request_gets_429_with_retry_after_at_once(runtime) -> None:
    # The model's forward waits on a gate, so the first request holds its slot until the test opens it.
    gate, entered = threading.Event(), threading.Event()

    def hold(*_):
        entered.set()
        gate.wait(60)

    hook = runtime.engine.target.decoder.register_forward_pre_hook(hold)
    settings = ServerSettings(NAME, max_tokens_limit=64, max_concurrent=1, max_queued=1)
    try:
        with running_server(runtime, settings) as server:
            url = f"{server.base_url}/chat/completions"

            async def scenario() -> None:
                async with httpx.AsyncClient(timeout=60) as client:
                    running = asyncio.create_task(client.post(url, json=_body(3)))
                    await _wait_for(entered.is_set)
                    queued = asyncio.create_task(client.post(url, json=_body(3)))
                    await _wait_for(lambda: _metric(server.url, "gemma_mtp:num_requests_waiting") == 1)
                    refused = await client.post(url, json=_body(3))
                    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
                    error = refused.json()["error"]
                    assert (error["type"], error["code"]) == ("rate_limit_error", "server_busy")
                    assert "--max-concurrent 1" in error["message"] and "--max-queued 1" in error["message"]
                    # Clients see it typed: the openai client's RateLimitError, ChatGemmaMTP's ServerBusyError.
                    with pytest.raises(openai.RateLimitError):
                        await openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0).chat.completions.create(
                            model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
                        )
                    with pytest.raises(ServerBusyError, match="busy"):
                        await ChatGemmaMTP(base_url=server.base_url, model=NAME, max_retries=0, max_tokens=3).ainvoke("hi")
                    assert not running.done() and not queued.done()  # refused at once, not after a slot freed
                    gate.set()
                    for reply in await asyncio.gather(running, queued):  # both answered in full, in turn
                        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3
                assert _metric(server.url, "gemma_mtp:num_requests_waiting") == 0

            asyncio.run(scenario())
            assert httpx.post(url, json=_body(3)).status_code == 200
    finally:
        gate.set()
        hook.remove()


def test_a_request_whose_kv_cache_can_never_fit_is_a_400_naming_the_limit_and_one_that_cannot_fit_now_waits() -> None:
    engine = Engine(build_target(seed=5), NoDrafter(), AutoTokenizer.from_pretrained(TOKENIZER_DIR), name=NAME)
    runtime = ChatRuntime(engine)
    prompt_tokens = len(runtime.prepare(ChatRequest(messages=_body(1)["messages"], max_tokens=1)).prompt_ids)
    engine.limit_kv_cache((prompt_tokens + 10 + HEADROOM) * engine.kv_bytes_per_position / MB)  # one request of 10
    with running_server(runtime, ServerSettings(NAME, max_tokens_limit=64)) as server:
        url = f"{server.base_url}/chat/completions"
        steps = engine.counters.steps
        refused = httpx.post(url, json=_body(11))
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["code"] == "kv_cache_limit_exceeded" and error["type"] == "invalid_request_error"
        assert "ask for at most 10 max_tokens" in error["message"] and "--kv-cache-mb" in error["message"]
        assert engine.counters.steps == steps  # refused before any forward
        with pytest.raises(KVCacheLimitError, match="--kv-cache-mb"):
            ChatGemmaMTP(base_url=server.base_url, model=NAME, max_tokens=11).invoke("xyz abc")

        async def two_at_once() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(url, json=_body(10)) for _ in range(2)))

        first, second = asyncio.run(two_at_once())  # room for one: the other waits its turn, then runs
        assert [r.status_code for r in (first, second)] == [200, 200]
        assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
        assert engine.kv_budget.held == 0
