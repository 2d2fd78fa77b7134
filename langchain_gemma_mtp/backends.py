"""Where ChatGemmaMTP's requests run: InProcessBackend (an Engine in this process) and the engine registry.

A backend takes a `ChatRequest` and returns OpenAI-style deltas (`stream`, `astream`) or a whole
message (`complete`, `acomplete`), so the chat model does not care whether the model runs here or
behind an OpenAI-compatible server (`http_backend.HTTPBackend`).

Engines are shared process-wide: every ChatGemmaMTP with the same (model, drafter, assistant,
device, dtype) uses one Engine, loaded on first use by exactly one thread.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from .draft_settings import DEFAULT_MTP_SIBLINGS, DEFAULT_MTP_STOP_BELOW
from .runtime import ChatRequest, ChatRuntime

if TYPE_CHECKING:  # the engine imports torch: load it only when a model is really used
    from .engine import Engine

EngineKey = tuple[str, str, str | None, str | None, str | None, float | None, int | None]


class Backend(Protocol):
    """What the chat model needs from wherever the model runs."""

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]: ...

    def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]: ...

    def complete(self, request: ChatRequest) -> dict[str, Any]: ...

    async def acomplete(self, request: ChatRequest) -> dict[str, Any]: ...


class InProcessBackend:
    """Runs requests on an Engine in this process, through its ChatRuntime."""

    def __init__(self, runtime: ChatRuntime) -> None:
        self.runtime = runtime

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]:
        return self.runtime.stream(request)

    def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]:
        return self.runtime.astream(request)

    def complete(self, request: ChatRequest) -> dict[str, Any]:
        return self.runtime.complete(request)

    async def acomplete(self, request: ChatRequest) -> dict[str, Any]:
        return await self.runtime.acomplete(request)


class _Registry:
    """Engines by key, each loaded once; one ChatRuntime per engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[EngineKey, Engine] = {}
        self._loading: dict[EngineKey, threading.Lock] = {}
        self._runtimes: weakref.WeakKeyDictionary[Engine, ChatRuntime] = weakref.WeakKeyDictionary()

    def engine(self, key: EngineKey) -> Engine:
        with self._lock:
            if key in self._engines:
                return self._engines[key]
            loading = self._loading.setdefault(key, threading.Lock())
        # Loading takes seconds to minutes: hold only this key's lock, so other models load in parallel.
        with loading:
            with self._lock:
                if key in self._engines:
                    return self._engines[key]
            from .engine import Engine

            model, drafter, assistant, device, dtype, stop_below, siblings = key
            engine = Engine.from_pretrained(
                model, drafter=drafter, assistant=assistant, device=device, dtype=dtype, mtp_stop_below=stop_below,
                mtp_siblings=siblings,
            )
            with self._lock:
                self._engines[key] = engine
                self._loading.pop(key, None)
            return engine

    def runtime(self, engine: Engine, model_name: str | None = None) -> ChatRuntime:
        with self._lock:
            runtime = self._runtimes.get(engine)
            if runtime is None:
                runtime = self._runtimes[engine] = ChatRuntime(engine, model_name=model_name)
            return runtime

    def loaded(self) -> list[EngineKey]:
        with self._lock:
            return list(self._engines)


REGISTRY = _Registry()


def engine_key(
    model: str, drafter: str, assistant: str | None, device: str | None, dtype: str | None,
    mtp_stop_below: float | None = None, mtp_siblings: int | None = None,
) -> EngineKey:
    # A default spelled out is the default: one engine, not two copies of the model.
    stop_below = None if mtp_stop_below == DEFAULT_MTP_STOP_BELOW else mtp_stop_below
    siblings = None if mtp_siblings == DEFAULT_MTP_SIBLINGS else mtp_siblings
    return (str(model), drafter, None if assistant is None else str(assistant), device, dtype, stop_below, siblings)


def in_process_backend(
    model: str,
    drafter: str = "auto",
    assistant: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    mtp_stop_below: float | None = None,
    mtp_siblings: int | None = None,
    engine: Engine | None = None,
) -> InProcessBackend:
    """The backend for a model (loaded through the registry on first use) or for a ready engine."""
    if engine is None:
        engine = REGISTRY.engine(engine_key(model, drafter, assistant, device, dtype, mtp_stop_below, mtp_siblings))
    return InProcessBackend(REGISTRY.runtime(engine, model_name=model))
