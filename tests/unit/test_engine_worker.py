"""The owner thread: concurrent callers from threads and asyncio, fair interleaving, cancellation,
one thread per device shared by engines, and no thread (nor its OpenMP team) while idle."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_engine_greedy import prompt

from langchain_gemma_mtp.engine import Engine, on_short_lived_thread, release_thread_team
from langchain_gemma_mtp.engine.drafters import NgramDrafter
from langchain_gemma_mtp.engine.head import ScreenedHead
from langchain_gemma_mtp.engine.openmp import _pause_all
from langchain_gemma_mtp.engine.types import Burst, EngineCounters, SpeculativeStats
from langchain_gemma_mtp.engine.worker import EngineWorker


def _uses_libgomp() -> bool:
    return _pause_all() is not None


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


# -- the callers' own OpenMP teams (engine/openmp.py) ----------------------------------------------

# These count the process's threads: in a pytest-xdist worker, beside execnet's own threads and
# with one torch thread (conftest), they run instead in a process of their own while no other
# worker runs a test (the test below: beside a busy neighbour worker one of them failed twice).
UNDER_XDIST = "PYTEST_XDIST_WORKER" in os.environ
needs_teams = pytest.mark.skipif(
    not sys.platform.startswith("linux") or torch.get_num_threads() < 2 or not _uses_libgomp() or UNDER_XDIST,
    reason="counts the GNU libgomp pool threads a parallel op leaves behind (Linux, 2+ torch threads, one pytest process)",
)


TEAM_TESTS = "release_thread_team_frees or hands_its_team_back or hands_back_its_team or callers_on_the_main_thread or screens_pack"


@pytest.mark.skipif(
    not UNDER_XDIST or not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2 or not _uses_libgomp(),
    reason="they run in place (or nowhere, as there)",
)
def test_the_openmp_team_tests_pass_in_a_process_of_their_own():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", __file__, "-k", TEAM_TESTS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "5 passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-3000:]


def parallel_op() -> None:
    """A torch op big enough to run on every torch thread: the calling thread keeps an OpenMP team after it."""
    x = torch.randn(384, 384)
    x @ x


def pool_size() -> int:
    return torch.get_num_threads() - 1  # the team's threads beside the calling one


@needs_teams
def test_release_thread_team_frees_only_the_calling_threads_pool():
    out: dict[str, object] = {}
    go_on = threading.Event()

    def other():
        parallel_op()  # a team that is not the caller's: it must stay
        out["ready"] = True
        go_on.wait()

    helper = threading.Thread(target=other)
    helper.start()
    assert wait_until(lambda: out.get("ready"))
    parallel_op()
    with_teams = settled_threads()
    assert release_thread_team() is True
    assert settled_threads() == with_teams - pool_size()
    assert release_thread_team() is True  # no team: nothing to do, no error
    assert settled_threads() == with_teams - pool_size()
    parallel_op()  # the thread's next parallel op starts its pool again
    assert settled_threads() == with_teams
    go_on.set()
    helper.join()


@needs_teams
def test_a_caller_that_ran_torch_work_hands_its_team_back_before_the_engine_runs(engine, expected):
    # A notebook's or an agent's main thread runs a model, then calls the engine: its idle team beside
    # the owner thread's would make libgomp throttle every op (benchmarks/owner_thread_bench.py).
    assert wait_until(lambda: not engine.worker.running)
    release_thread_team()
    without_team = settled_threads()
    beside = without_team + 1 + pool_size()  # the owner thread and its own team
    forwards, over = [], []

    def count(*args):
        # A pool just handed back may still be exiting on a busy machine (listed in /proc until it
        # runs); a parked team stays, and fails this.
        forwards.append(os_threads())
        if not wait_until(lambda: os_threads() <= beside, timeout=2.0):
            over.append(os_threads())

    hook = engine.target.decoder.register_forward_pre_hook(count)
    try:
        parallel_op()
        assert settled_threads() == without_team + pool_size()
        assert engine.generate(prompt(0), max_new_tokens=30, stop_token_ids=[]).token_ids == expected[0]
        # Every forward ran beside no team of this thread: only the owner thread and its own team were added.
        assert forwards and not over, over

        async def main():
            parallel_op()  # the event loop's thread: the same hand-back on `await`
            return await engine.agenerate(prompt(1), max_new_tokens=30, stop_token_ids=[])

        forwards.clear()
        assert asyncio.run(main()).token_ids == expected[1]
        assert forwards and not over, over
    finally:
        hook.remove()


def gated_bursts(gate: threading.Event, count: int):
    """A request's steps that each wait for `gate`: the consumer then has to wait for every burst."""
    for i in range(count):
        gate.wait()
        gate.clear()
        yield Burst([i], drafted=0, accepted=0, finish_reason="length" if i == count - 1 else None)


def open_when_threads(count: int, gate: threading.Event) -> Callable[[], bool]:
    """Set `gate` once the process has `count` threads besides the opener's own (or after 10 s, so
    that a failing test ends). The returned call waits for the opener and says whether the count was
    reached: counted after the opener ends, its thread may still be in /proc on a busy machine."""
    held: list[bool] = []
    thread = threading.Thread(target=lambda: (held.append(wait_until(lambda: os_threads() - 1 == count)), gate.set()))
    thread.start()
    return lambda: (thread.join(), held[0])[1]


@needs_teams
def test_a_consumer_hands_back_its_team_on_submit_and_before_each_wait_for_a_burst():
    # A stream consumer that runs torch between bursts (embedding the text so far, say) gets a team
    # again each time; it must be gone whenever the consumer waits for the owner thread.
    worker = EngineWorker("openmp-test")  # its own owner thread, running no torch: only the caller has a team
    gate = threading.Event()
    release_thread_team()
    base = settled_threads()
    parallel_op()
    handle = worker.submit(gated_bursts(gate, 3), SpeculativeStats(drafter="none"), [], EngineCounters())
    assert settled_threads() == base + 1  # the owner thread, and no team of the caller's any more
    parallel_op()
    opened = open_when_threads(base + 1, gate)
    assert next(handle).token_ids == [0]
    assert opened(), "the consumer waited beside its own team"

    async def consume():
        parallel_op()  # on the event loop's thread
        opened = open_when_threads(base + 1, gate)
        burst = await handle.__anext__()
        return burst, opened()

    burst, without_team = asyncio.run(consume())
    assert burst.token_ids == [1] and without_team
    gate.set()
    assert handle.result().token_ids == [0, 1, 2]


@needs_teams
def test_callers_on_the_main_thread_threads_and_asyncio_that_ran_torch_all_get_their_outputs(engine, expected):
    def threaded(seed: int) -> list[int]:
        parallel_op()
        return engine.generate(prompt(seed), max_new_tokens=30, stop_token_ids=[]).token_ids

    async def asynchronous(seed: int) -> list[int]:
        parallel_op()
        return (await engine.agenerate(prompt(seed), max_new_tokens=30, stop_token_ids=[])).token_ids

    with ThreadPoolExecutor(3) as pool:
        threads = [pool.submit(threaded, s) for s in (1, 2)]
        loop = pool.submit(lambda: asyncio.run(asynchronous(3)))
        parallel_op()
        assert threaded(0) == expected[0]  # the main thread, beside the others
        assert [f.result(timeout=120) for f in threads] == [expected[1], expected[2]]
        assert loop.result(timeout=120) == expected[3]


@needs_teams
def test_the_screens_pack_runs_beside_no_team_of_its_own():
    # Loading packs the greedy screen on a thread of its own for seconds; the team its norms started
    # must not stay parked meanwhile, beside the caller's torch work and the owner thread's.
    weight = torch.randn(65536, 640) * 0.05  # a pack of about a second, as a real head's is longer
    release_thread_team()
    base = settled_threads()
    build = threading.Thread(target=lambda: ScreenedHead(weight))
    build.start()
    counts = []
    while build.is_alive():
        counts.append(os_threads())
        time.sleep(0.02)
    assert counts[-5:] == [base + 1] * 5, counts  # the pack's last 0.1 s: the building thread alone


EXIT_SCRIPT = """
import sys, threading, torch
from langchain_gemma_mtp.engine import Engine
torch.randn(384, 384) @ torch.randn(384, 384)  # the main thread holds a team, as a notebook's does
engine = Engine.from_pretrained(sys.argv[1])
ids = [2] + list(range(3, 32))
long = engine.submit(ids, max_new_tokens=200, num_draft_tokens=1, stop_token_ids=[])
threading.Thread(target=lambda: [None for _ in long], daemon=True).start()  # still streaming at exit
print(len(engine.generate(ids, max_new_tokens=5, stop_token_ids=[]).token_ids), flush=True)
"""


def output_of_a_clean_exit(script: str, *args: str) -> str:
    """What `script` printed, run in a fresh interpreter from the repository root that must exit with 0."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2]
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_interpreter_exits_cleanly_while_a_request_is_in_flight(checkpoints):
    # The owner thread is stopped at exit (a thread inside torch then would abort the process), the
    # main thread having handed its team back meanwhile.
    assert output_of_a_clean_exit(EXIT_SCRIPT, str(checkpoints["shared_ple"])).split() == ["5"]
