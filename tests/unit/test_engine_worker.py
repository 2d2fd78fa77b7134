"""The owner thread: concurrent callers from threads and asyncio, fair interleaving, cancellation,
one thread per device shared by engines, and no thread (nor its OpenMP team) while idle."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_engine_greedy import prompt

from langchain_gemma_mtp.engine import Engine, on_short_lived_thread
from langchain_gemma_mtp.engine.drafters import NgramDrafter


@pytest.fixture(scope="module")
def engine(checkpoints):
    return Engine.from_pretrained(checkpoints["shared_ple"])


@pytest.fixture(scope="module")
def expected(engine):
    return {s: engine.generate(prompt(s), max_new_tokens=30, stop_token_ids=[]).token_ids for s in range(4)}


def test_model_runs_only_on_the_owner_thread(engine):
    seen = set()
    hook = engine.target.decoder.register_forward_pre_hook(lambda *a: seen.add(threading.current_thread().name))
    try:
        engine.generate(prompt(0), max_new_tokens=5)
    finally:
        hook.remove()
    assert seen and all(name.startswith("gemma-mtp:") for name in seen)


def test_concurrent_threads_get_their_own_exact_outputs(engine, expected):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda s: engine.generate(prompt(s), max_new_tokens=30, stop_token_ids=[]).token_ids, list(range(4)) * 2))
    assert results == [expected[s] for s in list(range(4)) * 2]


def test_concurrent_asyncio_tasks(engine, expected):
    async def main():
        return await asyncio.gather(*[engine.agenerate(prompt(s), max_new_tokens=30, stop_token_ids=[]) for s in range(4)])

    results = asyncio.run(main())
    assert [r.token_ids for r in results] == [expected[s] for s in range(4)]


def test_new_request_is_served_while_a_long_one_runs(engine):
    long = engine.submit(prompt(1), max_new_tokens=200, num_draft_tokens=1, stop_token_ids=[])
    next(long)
    short = engine.submit(prompt(2), max_new_tokens=3, stop_token_ids=[])
    short.result()  # finishes while the long request is still in flight
    assert long.finish_reason is None and len(long.token_ids) < 200
    long.cancel()
    list(long)
    assert len(long.token_ids) < 200


def test_breaking_out_of_a_stream_cancels_it(engine, expected):
    handle = engine.submit(prompt(3), max_new_tokens=200, num_draft_tokens=1, stop_token_ids=[])
    for _ in handle:
        break
    handle.cancel()
    rest = list(handle)
    assert len(handle.token_ids) < 200 and len(rest) <= 2
    # The engine serves the next request normally.
    assert engine.generate(prompt(3), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[3]


def test_cancelled_asyncio_task_cancels_its_request(engine, expected):
    async def main():
        handle = engine.submit(prompt(2), max_new_tokens=200, num_draft_tokens=1, stop_token_ids=[])

        async def consume():
            async for _ in handle:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return handle

    handle = asyncio.run(main())
    assert handle._job.cancelled and len(handle.token_ids) < 200
    assert engine.generate(prompt(2), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[2]


def test_dropping_a_handle_cancels_its_request(engine):
    handle = engine.submit(prompt(1), max_new_tokens=200, num_draft_tokens=1, stop_token_ids=[])
    job = handle._job
    next(handle)
    del handle
    with job.ready:
        job.ready.wait_for(lambda: job.outbox and job.outbox[-1] is not None and job.outbox[-1].__class__ is object, timeout=60)
    assert job.cancelled


def test_an_error_inside_a_step_reaches_its_caller_and_the_worker_survives(engine, expected):
    class Boom(RuntimeError):
        pass

    class Exploding:
        def propose(self, step):
            raise Boom("drafter failed")

        def close(self, tokens):
            pass

    engine.drafter.open, saved = (lambda request: Exploding()), engine.drafter.open
    try:
        with pytest.raises(Boom):
            engine.generate(prompt(0), max_new_tokens=10, stop_token_ids=[])
    finally:
        engine.drafter.open = saved
    assert engine.generate(prompt(0), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[0]


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def os_threads() -> int:
    return len(list(Path("/proc/self/task").iterdir()))


def settled_threads(quiet: float = 0.3) -> int:
    """The process's thread count once it has stayed the same for `quiet` seconds: threads of earlier
    tests (an owner thread that just returned, executor threads) may still be ending."""
    count, since = os_threads(), time.monotonic()
    deadline = since + 10.0
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.01)
        if (now := os_threads()) != count:
            count, since = now, time.monotonic()
    return count


@pytest.fixture(scope="module")
def sibling(engine):
    """A second engine over the same model (another drafter), on the same device."""
    return Engine(engine.model, NgramDrafter(), engine.tokenizer)


def test_engines_on_one_device_share_its_owner_thread_and_keep_their_own_counters(engine, sibling, expected):
    assert sibling.worker is engine.worker
    before, sibling_before = engine.counters.steps, sibling.counters.steps
    result = sibling.generate(prompt(1), max_new_tokens=30, stop_token_ids=[])
    assert result.token_ids == expected[1]
    assert engine.counters.steps == before
    assert sibling.counters.steps == sibling_before + result.stats.target_forwards


def test_a_request_on_one_engine_is_served_while_another_engines_long_one_runs(engine, sibling, expected):
    long = engine.submit(prompt(1), max_new_tokens=200, num_draft_tokens=1, stop_token_ids=[])
    next(long)
    assert sibling.generate(prompt(2), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[2]
    assert long.finish_reason is None and len(long.token_ids) < 200
    long.cancel()
    list(long)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts the process's threads in /proc")
def test_the_owner_thread_and_its_openmp_team_end_when_idle_and_come_back_for_the_next_request(engine, expected):
    # An idle thread that ran torch work keeps an OpenMP team, which slows every other torch thread
    # in the process (benchmarks/owner_thread_bench.py); so no thread may outlive its requests.
    assert wait_until(lambda: not engine.worker.running)
    idle = settled_threads()
    assert engine.generate(prompt(0), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[0]
    assert wait_until(lambda: not engine.worker.running)
    # At most the idle count: an unrelated thread may still end meanwhile, none of ours may stay.
    assert wait_until(lambda: os_threads() <= idle), f"{os_threads() - idle} threads outlived the request"
    assert engine.generate(prompt(3), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[3]


def test_on_short_lived_thread_returns_the_result_raises_the_error_and_leaves_no_thread():
    caller = threading.current_thread()
    ran_on = []

    def work():
        ran_on.append(threading.current_thread())
        return 42

    assert on_short_lived_thread(work) == 42
    assert ran_on[0] is not caller and not ran_on[0].is_alive()
    with pytest.raises(ZeroDivisionError):
        on_short_lived_thread(lambda: 1 / 0)
