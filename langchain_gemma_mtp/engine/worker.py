"""The owner thread that runs the models on one device: a round-robin queue of requests, cancellable
per step, alive only while requests are; requests wait in arrival order until their KV cache fits."""

from __future__ import annotations

import asyncio
import atexit
import collections
import threading
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

import torch

from ..errors import KVCacheLimitError
from .memory import KVBudget
from .openmp import release_thread_team
from .types import Burst, EngineCounters, GenerationResult, SpeculativeStats

T = TypeVar("T")
_END = object()
_WORKERS: dict[str, EngineWorker] = {}  # one per device
_WORKERS_LOCK = threading.Lock()


class _Job:
    """Worker-side state of one request: its step generator and its outbox."""

    def __init__(self, bursts: Generator[Burst, None, None], counters: EngineCounters, budget: KVBudget | None, kv_bytes: int):
        self.bursts = bursts
        self.counters = counters  # its engine's totals
        self.budget = budget  # its engine's KV budget, which it holds kv_bytes of while it runs
        self.kv_bytes = kv_bytes
        self.holds = False
        self.cancelled = False
        self.outbox: collections.deque = collections.deque()
        self.ready = threading.Condition()
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def put(self, item: object) -> None:
        with self.ready:
            self.outbox.append(item)
            self.ready.notify_all()
            waiters, self.waiters = self.waiters, []
        for loop, fut in waiters:
            try:
                loop.call_soon_threadsafe(_wake, fut)
            except RuntimeError:  # that event loop is closed: nobody is waiting there any more
                pass

    def end(self, last: object = _END) -> None:
        """Hand the consumer its last item and give back the KV cache the job held."""
        self.bursts.close()
        if self.holds and self.budget is not None:
            self.budget.give_back(self.kv_bytes)
            self.holds = False
        self.put(last)


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class RequestHandle:
    """Consumer side of one request: iterate bursts from any thread, or `async for` from asyncio.

    `stats`, `token_ids` and `finish_reason` fill as bursts arrive. Dropping the handle, breaking
    out and calling `cancel()` all stop the request at its next verification step.
    """

    def __init__(self, job: _Job, stats: SpeculativeStats, prompt_tokens: int):
        self._job = job
        self.stats = stats
        self.prompt_tokens = prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._done = False

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the prefix cache supplied (known once the first burst arrived)."""
        return self.stats.cached_tokens

    def _take(self, item: object) -> Burst:
        if item is _END:
            self._done = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        item = cast(Burst, item)  # the outbox holds bursts, then an exception or _END
        self.token_ids.extend(item.token_ids)
        self.finish_reason = item.finish_reason or self.finish_reason
        return item

    def __iter__(self) -> RequestHandle:
        return self

    def __next__(self) -> Burst:
        if self._done:
            raise StopIteration
        job = self._job
        if not job.outbox:  # about to wait: the team of any torch work this thread did meanwhile goes
            release_thread_team()
        with job.ready:
            job.ready.wait_for(lambda: job.outbox)
            item = job.outbox.popleft()
        return self._take(item)

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Burst:
        if self._done:
            raise StopAsyncIteration
        job = self._job
        loop = asyncio.get_running_loop()
        if not job.outbox:  # as in __next__
            release_thread_team()
        while True:
            with job.ready:
                if job.outbox:
                    item = job.outbox.popleft()
                    break
                fut = loop.create_future()
                job.waiters.append((loop, fut))
            try:
                await fut
            except asyncio.CancelledError:
                with job.ready:
                    if (loop, fut) in job.waiters:
                        job.waiters.remove((loop, fut))
                self.cancel()
                raise
        try:
            return self._take(item)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        """Stop generating at the next step; iteration then ends."""
        if not self._done:
            self._job.cancelled = True

    def _result(self) -> GenerationResult:
        return GenerationResult(list(self.token_ids), self.finish_reason or "length", self.stats, self.prompt_tokens)

    def result(self) -> GenerationResult:
        """Run to the end and return the whole result."""
        for _ in self:
            pass
        return self._result()

    async def aresult(self) -> GenerationResult:
        async for _ in self:
            pass
        return self._result()

    def __del__(self) -> None:
        self._job.cancelled = True


class EngineWorker:
    """Runs every forward on one device, on one thread, under inference mode.

    Active requests (of every engine on the device) take turns one verification step at a time, so
    a new request's first burst does not wait for a long one to finish and every stream keeps
    moving. One thread per device, and none while idle, because of how PyTorch's CPU kernels run:
    every thread that has run a parallel op keeps a team of OpenMP threads, and once these
    outnumber the cores, libgomp stops spinning between ops and every small op pays a wake-up
    (benchmarks/owner_thread_bench.py measures it; docs/research-notes.md, "Owner thread"). So engines share their device's thread, and it
    ends when its queue empties; and a thread that submits or waits for a burst hands back the team of
    its own earlier torch work (engine/openmp.py), so a notebook's or an agent's main thread that ran
    a model costs the engine nothing. A team held by a thread that never calls the engine still does.
    """

    def __init__(self, name: str):
        self.name = name
        self._active: collections.deque[_Job] = collections.deque()
        self._waiting: collections.deque[_Job] = collections.deque()  # not started: their KV cache does not fit yet
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def for_device(cls, device: torch.device | str) -> EngineWorker:
        """The process's worker for `device` (made on first use)."""
        key = str(device)
        with _WORKERS_LOCK:
            if key not in _WORKERS:
                _WORKERS[key] = cls(key)
            return _WORKERS[key]

    @property
    def running(self) -> bool:
        """Whether an owner thread is serving requests (there is none while idle)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def submit(
        self,
        bursts: Generator[Burst, None, None],
        stats: SpeculativeStats,
        prompt_tokens: int,
        counters: EngineCounters,
        budget: KVBudget | None = None,
        kv_bytes: int = 0,
    ) -> RequestHandle:
        """Queue a request's steps; `counters` (its engine's) get every burst it yields. With a
        `budget`, the request starts once `kv_bytes` fit beside the running requests' (in arrival order).
        The calling thread hands back its own idle OpenMP team first (engine/openmp.py says why)."""
        release_thread_team()
        job = _Job(bursts, counters, budget, kv_bytes)
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"the {self.name} owner thread was stopped (the interpreter is exiting); nothing runs after that")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"gemma-mtp:{self.name}", daemon=True)
                self._thread.start()
        return RequestHandle(job, stats, prompt_tokens)

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread after its current step (pending requests end with it)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests queued until their KV cache fits."""
        return len(self._waiting)

    def _admit(self) -> None:
        """Start waiting requests in arrival order while their KV cache fits (called under the lock)."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft().end()
            elif job.budget is None or job.budget.take(job.kv_bytes):
                job.holds = job.budget is not None
                self._active.append(self._waiting.popleft())
            elif not job.budget.held:  # nothing runs that could make room: the budget shrank under it
                need, limit = job.kv_bytes / 2**20, job.budget.limit_bytes / 2**20
                self._waiting.popleft().end(
                    KVCacheLimitError(
                        f"this request's KV cache ({need:.1f} MB) no longer fits the engine's limit of {limit:.1f} MB: raise the limit."
                    )
                )
            else:
                return

    def _next_job(self) -> _Job | None:
        """The next request to step, or None after the thread is let go (idle or stopping)."""
        with self._lock:
            if self._stopping:
                for job in (*self._active, *self._waiting):
                    job.end()
                self._active.clear()
                self._waiting.clear()
            self._admit()
            if not self._active:
                self._thread = None  # a submit from now on starts a new thread
                return None
            return self._active.popleft()

    def _run(self) -> None:
        with torch.inference_mode():
            while (job := self._next_job()) is not None:
                if job.cancelled:
                    self._end(job)
                    continue
                try:
                    burst = next(job.bursts)
                except StopIteration:
                    self._end(job)
                    continue
                except BaseException as exc:  # handed to the consumer; the worker serves the others
                    self._end(job, exc)
                    continue
                job.counters.add(burst)
                job.put(burst)
                if burst.finish_reason is not None:
                    self._end(job)
                else:
                    with self._lock:
                        self._admit()  # requests that arrived during this step are stepped before this one again
                        self._active.append(job)

    def _end(self, job: _Job, last: object = _END) -> None:
        job.bursts.close()  # runs the request's cleanup (its prefix-cache entry) outside the lock
        with self._lock:  # the budget it gives back is read by _admit under the lock
            job.end(last)


def on_short_lived_thread(fn: Callable[[], T]) -> T:
    """`fn()` run on a thread that ends with it; its result or exception comes back here.

    For torch work outside the engine (a conversion, a baseline, a measurement) on a thread that
    never calls the engine: run there, it would keep an OpenMP team beside the owner thread's (see
    EngineWorker); the threads that call the engine hand theirs back by themselves."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@atexit.register
def _stop_workers() -> None:
    # A thread still inside torch when the interpreter exits aborts the process.
    with _WORKERS_LOCK:
        workers = list(_WORKERS.values())
    for worker in workers:
        worker.stop()
