"""The owner thread that runs the models on one device: each round verifies the pending step of every
request in flight in one batched forward and feeds new requests' prompt chunks in another; requests
are cancellable per step, the thread lives only while requests do, and requests wait in arrival
order until their KV cache fits."""

from __future__ import annotations

import asyncio
import atexit
import collections
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

import torch

from ..errors import KVCacheLimitError
from .batch import Feed, run_feed, run_feeds
from .cache import common_prefix_length
from .costs import CostModel
from .drafters import Draft, DraftAsk, propose_all
from .loop import PREFILL_CHUNK, Steps
from .matmul import measured_forms
from .memory import KVBudget
from .openmp import release_thread_team
from .target import Forward
from .types import Burst, EngineCounters, GenerationResult, SpeculativeStats

T = TypeVar("T")
_END = object()
_WORKERS: dict[str, EngineWorker] = {}  # one per device
_WORKERS_LOCK = threading.Lock()


# A request whose prompt shares this many tokens with one still prefilling waits for it and reuses
# its cache; a shorter overlap is cheaper to prefill twice than to leave out of the packed forward.
SHARED_PREFIX = 32

# A round feeds up to PREFILL_CHUNK prompt tokens per request waiting to prefill, at most this many
# chunks' worth in all: one long prompt beside streams still delays them by one chunk a round,
# while a burst of new requests starts in half the rounds (16 clients on the 270M: the slowest first
# chunk 1.8-1.9 -> 1.2 s; four chunks' worth started them no sooner and ran slower).
PREFILL_ROUND_CHUNKS = 2

# Verification rows per batched forward: more requests than fit wait for the next round, in turn.
MAX_BATCH_ROWS = 512


class _Job:
    """Worker-side state of one request: its steps (engine/loop.py), the feed it waits on, its outbox."""

    def __init__(self, bursts: Steps, prompt: Sequence[int], counters: EngineCounters, budget: KVBudget | None, kv_bytes: int):
        self.bursts = bursts
        self.prompt = prompt  # its prompt ids: who may prefill beside whom
        self.feed: Feed | DraftAsk | None = None  # what it waits on (None: not started)
        self.counters = counters  # its engine's totals
        self.budget = budget  # its engine's KV budget, which it holds kv_bytes of while it runs
        self.kv_bytes = kv_bytes
        self.holds = False
        self.cancelled = False
        self.done = False
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

    Active requests (of every engine on the device) step together, round by round: each round drafts
    for every request waiting on a draft (one batch per drafter), verifies every pending draft in one
    batched target forward per model (engine/batch.py; past MAX_BATCH_ROWS rows the rest go first
    next round), and feeds new requests' prompts in that same forward, at most one chunk each and
    PREFILL_ROUND_CHUNKS chunks' worth in all, so a new request's first burst does not wait for a
    long one to finish, every stream keeps moving, several new prompts share a forward, and
    requests sharing a prompt prefill it once. One thread per device, and none while idle, because of how PyTorch's CPU kernels run:
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
        bursts: Steps,
        stats: SpeculativeStats,
        prompt_ids: Sequence[int],
        counters: EngineCounters,
        budget: KVBudget | None = None,
        kv_bytes: int = 0,
    ) -> RequestHandle:
        """Queue a request's steps; `counters` (its engine's) get every burst it yields. With a
        `budget`, the request starts once `kv_bytes` fit beside the running requests' (in arrival order).
        The calling thread hands back its own idle OpenMP team first (engine/openmp.py says why)."""
        release_thread_team()
        job = _Job(bursts, prompt_ids, counters, budget, kv_bytes)
        with self._lock:
            if self._stopping:
                raise RuntimeError(f"the {self.name} owner thread was stopped (the interpreter is exiting); nothing runs after that")
            self._waiting.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run_thread, name=f"gemma-mtp:{self.name}", daemon=True)
                self._thread.start()
        return RequestHandle(job, stats, len(prompt_ids))

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

    def _round(self) -> bool:
        """Step every active request once: admit waiting ones, draft for those waiting on a draft (one
        batch per drafter), then verify every pending block and feed prompt chunks (see `_chunks`) in
        one batched forward per model; each request runs on to what it needs next. False once the
        thread is let go (idle or stopping)."""
        with self._lock:
            if self._stopping:
                for job in (*self._active, *self._waiting):
                    job.end()
                self._active.clear()
                self._waiting.clear()
            self._admit()
            if not self._active:
                self._thread = None  # a submit from now on starts a new thread
                return False
            jobs = list(self._active)
        for job in jobs:
            if job.cancelled:
                self._end(job)
        jobs = [job for job in jobs if not job.done]
        prefilling = [job for job in jobs if job.feed is None or (isinstance(job.feed, Feed) and job.feed.prefill)]
        self._draft([job for job in jobs if isinstance(job.feed, DraftAsk)])
        batch: list[tuple[_Job, Feed]] = []
        rows = 0
        for job in jobs:  # in turn: the active queue rotates below
            if not isinstance(job.feed, Feed) or job.feed.prefill:
                continue
            if batch and rows + job.feed.width > MAX_BATCH_ROWS:
                break
            batch.append((job, job.feed))
            rows += job.feed.width
        # Prompt chunks join the verification forward: one forward's fixed cost (the weights read,
        # the LM head's) a round instead of two while prompts prefill beside streams.
        for group in _by_target([*batch, *self._chunks(prefilling)]):
            self._run(group, run_feeds)
        with self._lock:
            stepped = {id(job) for job, _ in batch}
            # Requests left out of a full batch go first next round.
            self._active = collections.deque(sorted((j for j in self._active if not j.done), key=lambda j: id(j) in stepped))
        return True

    def _chunks(self, jobs: list[_Job]) -> list[tuple[_Job, Feed]]:
        """This round's prompt chunks: at most one per request, in arrival order, up to PREFILL_CHUNK
        tokens per request waiting and PREFILL_ROUND_CHUNKS chunks' worth in all. A request starts
        (looks up the prefix cache) beside others still prefilling unless its prompt shares
        SHARED_PREFIX tokens with one of theirs; then it waits for that prefill to end, so requests
        sharing a prompt prefill it once."""
        chunks: list[tuple[_Job, Feed]] = []
        fed, budget = 0, PREFILL_CHUNK * min(len(jobs), PREFILL_ROUND_CHUNKS)
        for job in jobs:
            if job.feed is None:
                if any(_prefilling(other) and common_prefix_length(job.prompt, other.prompt) >= SHARED_PREFIX for other in jobs):
                    continue
                self._advance(job, None)  # its prefix-cache lookup, then its first chunk
            if not _prefilling(job):
                continue  # it failed to start
            feed = cast(Feed, job.feed)
            if chunks and fed + feed.width > budget:
                break
            chunks.append((job, feed))
            fed += feed.width
        return chunks

    def _draft(self, jobs: list[_Job]) -> None:
        """The drafts every waiting request asked for, one batch per drafter; a drafter that fails
        fails the requests it drafted for alone."""
        by_drafter: dict[int, list[tuple[_Job, DraftAsk]]] = {}
        for job in jobs:
            ask = cast(DraftAsk, job.feed)
            by_drafter.setdefault(id(ask.drafter), []).append((job, ask))
        for group in by_drafter.values():
            drafts: list[Draft | None]
            try:
                started = time.perf_counter()
                drafts = list(propose_all(group[0][1].drafter, [(ask.session, ask.step) for _, ask in group]))
                # Every drafter copies its tokens to the host, so the clock includes its device work.
                seconds, drafted = time.perf_counter() - started, sum(len(d) for d in drafts if d)
                for costs in _each([ask.costs for _, ask in group]):
                    costs.observe_draft(drafted, seconds, len(group))
            except BaseException as exc:
                if len(group) == 1:
                    self._end(group[0][0], exc)
                    continue
                # Find whose draft failed: each alone, so one request's failure ends that request only.
                drafts = []
                for job, ask in group:
                    try:
                        drafts.append(ask.session.propose(ask.step))
                    except BaseException as alone:
                        self._end(job, alone)
                        drafts.append(None)
            for (job, _), draft in zip(group, drafts):
                if draft is not None and not job.done:
                    self._advance(job, draft)

    def _run(self, jobs: list[tuple[_Job, Feed]], forward: Callable[[list[Feed]], list[Forward]]) -> None:
        """One forward over these jobs' feeds; each job then runs on to its next feed. A forward that
        fails fails the requests in it (their caches are half written); the others go on."""
        try:
            feeds = [feed for _, feed in jobs]
            started = time.perf_counter()
            outs = forward(feeds)
            if any(f.costs for f in feeds) and feeds[0].target.device.type == "cuda":
                torch.cuda.synchronize(feeds[0].target.device)  # the clock must include the device's work
            seconds = time.perf_counter() - started
            verified = sum(not f.prefill for f in feeds) or None
            # A forward with prompt rows prices no width: those rows skip the LM head.
            width = sum(f.width for f in feeds) if verified == len(feeds) else 0
            for costs in _each([f.costs for f in feeds]):
                costs.observe_forward(width, seconds, verified)
        except BaseException as exc:
            for job, _ in jobs:
                self._end(job, exc)
            return
        for (job, _), out in zip(jobs, outs):
            self._advance(job, out)

    def _advance(self, job: _Job, answer: Draft | Forward | None) -> None:
        """Send a job the answer to what it waited on and run it on to what it waits on next (a draft
        or a forward), handing over the bursts on the way."""
        try:
            item = job.bursts.send(answer)
            while isinstance(item, Burst):
                job.counters.add(item)
                job.put(item)
                if item.finish_reason is not None:
                    self._end(job)
                    return
                item = job.bursts.send(None)
            job.feed = item
        except StopIteration:
            self._end(job)
        except BaseException as exc:  # handed to the consumer; the worker serves the others
            self._end(job, exc)

    def _run_thread(self) -> None:
        with torch.inference_mode(), measured_forms():
            while self._round():
                pass

    def _end(self, job: _Job, last: object = _END) -> None:
        if job.done:
            return
        job.feed = None
        job.done = True
        job.bursts.close()  # runs the request's cleanup (its prefix-cache entry) outside the lock
        with self._lock:  # the budget it gives back is read by _admit under the lock
            job.end(last)


def run_alone(steps: Steps) -> Iterator[Burst]:
    """One request's steps run on the calling thread, nothing batched with them: its bursts. For
    tests and tools that drive `speculative_decode` themselves; engines go through EngineWorker."""
    answer: Draft | Forward | None = None
    while True:
        try:
            item = steps.send(answer)
        except StopIteration:
            return
        if isinstance(item, DraftAsk):
            answer = propose_all(item.drafter, [(item.session, item.step)])[0]
        elif isinstance(item, Feed):
            answer = run_feed(item)
        else:
            answer = None
            yield item


def _prefilling(job: _Job) -> bool:
    """Whether a job has started and waits on a prompt chunk."""
    return isinstance(job.feed, Feed) and job.feed.prefill


def _by_target(feeds: list[tuple[_Job, Feed]]) -> list[list[tuple[_Job, Feed]]]:
    """Jobs' feeds grouped by the target model they run on, in order: one forward per group."""
    groups: dict[int, list[tuple[_Job, Feed]]] = {}
    for job, feed in feeds:
        groups.setdefault(id(feed.target.model), []).append((job, feed))
    return list(groups.values())


def _each(costs: list[CostModel | None]) -> list[CostModel]:
    """The distinct engines' cost models among `costs`: a batch may span engines, and each records a
    measurement once."""
    return list({id(c): c for c in costs if c is not None}.values())


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
