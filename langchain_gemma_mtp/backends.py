"""Where ChatGemmaMTP's requests run: InProcessBackend (an Engine in this process) and the engine registry.

A backend takes a `ChatRequest` and returns OpenAI-style deltas (`stream`, `astream`) or a whole
message (`complete`, `acomplete`), and counts tokens the way the model will see them
(`prompt_ids`, `text_ids`), so the chat model does not care whether the model runs here or
behind an OpenAI-compatible server (`http_backend.HTTPBackend`).

Engines are shared process-wide: every ChatGemmaMTP with the same `EngineSpec` (model, drafter,
assistant, device, dtype, drafter settings, load options) uses one Engine, loaded on first use by
exactly one thread.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .engine_spec import EngineSpec
from .errors import MissingDependencyError
from .runtime import ChatRequest, ChatRuntime

if TYPE_CHECKING:  # the engine imports torch: load it only when a model is really used
    from .engine import Engine


LOCAL_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub")


def require_local_packages() -> None:
    """Raise MissingDependencyError, naming the extra, unless this process can run a model itself.

    Looks the packages up without importing them, so constructing a chat model stays cheap.
    """
    missing = []
    for name in LOCAL_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    if missing:
        raise MissingDependencyError(
            f"running the model in this process needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            "pip install 'langchain-gemma-mtp[local]' (install torch first for your platform), "
            "or pass base_url= to use a server (`gemma-mtp serve`, vLLM) instead."
        )


def context_length(model: str) -> int | None:
    """The context window (`max_position_embeddings`) of a model dir, or of a hub id in the local
    hub cache, read from its config.json without loading anything; None when it is not at hand."""
    local = Path(model).expanduser() / "config.json"
    path: Path | str | None = local
    if not local.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        cached = try_to_load_from_cache(model, "config.json")
        path = cached if isinstance(cached, str) else None
    if path is None:
        return None
    config = json.loads(Path(path).read_text())
    # Multimodal checkpoints (Gemma 4) keep the language model's settings under text_config.
    value = (config.get("text_config") or config).get("max_position_embeddings")
    return value if isinstance(value, int) else None


class Backend(Protocol):
    """What the chat model needs from wherever the model runs."""

    def stream(self, request: ChatRequest) -> Iterator[dict[str, Any]]: ...

    def astream(self, request: ChatRequest) -> AsyncIterator[dict[str, Any]]: ...

    def complete(self, request: ChatRequest) -> dict[str, Any]: ...

    async def acomplete(self, request: ChatRequest) -> dict[str, Any]: ...

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        """The token ids the model is given for this request (chat template, tools and all)."""
        ...

    def text_ids(self, text: str) -> list[int]:
        """The token ids of plain text, as message text is tokenized."""
        ...


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

    def prompt_ids(self, request: ChatRequest) -> list[int]:
        return self.runtime.prepare(request).prompt_ids

    def text_ids(self, text: str) -> list[int]:
        return self.runtime.encode_text(text)


class _Registry:
    """Engines by key, each loaded once; one ChatRuntime per engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines: dict[EngineSpec, Engine] = {}
        self._loading: dict[EngineSpec, threading.Lock] = {}
        self._runtimes: weakref.WeakKeyDictionary[Engine, ChatRuntime] = weakref.WeakKeyDictionary()

    def engine(self, key: EngineSpec) -> Engine:
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

            engine = Engine.from_spec(key)
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

    def loaded(self) -> list[EngineSpec]:
        with self._lock:
            return list(self._engines)


REGISTRY = _Registry()


def engine_key(
    model: str,
    drafter: str,
    assistant: str | None,
    device: str | None,
    dtype: str | None,
    mtp_stop_below: float | None = None,
    mtp_siblings: int | None = None,
    load_options: Mapping[str, Any] | None = None,
    prefix_cache_mb: float | None = None,
) -> EngineSpec:
    """The registry key of an in-process engine: its checked `EngineSpec`."""
    require_local_packages()
    return EngineSpec.of(
        model,
        drafter,
        assistant,
        device,
        dtype,
        mtp_stop_below=mtp_stop_below,
        mtp_siblings=mtp_siblings,
        load_options=load_options,
        prefix_cache_mb=prefix_cache_mb,
    )


def in_process_backend(
    model: str,
    drafter: str = "auto",
    assistant: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    *,
    mtp_stop_below: float | None = None,
    mtp_siblings: int | None = None,
    load_options: Mapping[str, Any] | None = None,
    prefix_cache_mb: float | None = None,
    engine: Engine | None = None,
) -> InProcessBackend:
    """The backend for a model (loaded through the registry on first use) or for a ready engine.

    load_options: `model_kwargs` for `from_pretrained` (see engine_spec.LOAD_OPTIONS); prefix_cache_mb: memory
    for the KV caches of recent requests (None: the engine's default)."""
    if engine is None:
        key = engine_key(model, drafter, assistant, device, dtype, mtp_stop_below, mtp_siblings, load_options, prefix_cache_mb)
        engine = REGISTRY.engine(key)
    return InProcessBackend(REGISTRY.runtime(engine, model_name=model))
