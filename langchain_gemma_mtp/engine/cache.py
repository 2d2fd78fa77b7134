"""KV caches that roll back anywhere, and the cross-call prefix cache that lets a request skip the
prefill of what an earlier request already computed.

Every layer writes its K/V into a buffer it grows GROW positions at a time, where transformers'
dynamic layers concatenate: a forward then writes only its new rows, instead of copying the whole
cache once per layer (on the 270M 16 requests' copies took 13 of a 125 ms forward, and a request
after 4k positions copies megabytes per layer per step). The layer's `keys` and `values` stay
views of exactly the positions it holds, so everything that reads them is unchanged.

Sliding-window layers normally keep only the last `window - 1` positions, which makes a cache
unusable for any prefix shorter than what it holds. Ours keep every position and still hand
attention only the window (as transformers' past-recording layer does), so cropping to any length
is exact and a stored cache serves every request that shares any prefix of it.

Stored positions are never written again: a request starts from views of a stored entry at no
copy cost, and copies them into a buffer of its own at its first write. A layer writes in place
only past every position a snapshot (the prefix cache) took of it; a write below that (after a
rollback below a stored length) first copies to a new buffer.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..engine_spec import DEFAULT_PREFIX_CACHE_MB
from ..errors import InvalidRequestError

LayerKV = tuple[torch.Tensor, torch.Tensor] | None  # None: a layer that holds nothing (kv-shared)
# Positions a layer's buffer holds beyond what it was asked to: one copy every GROW positions (a
# few dozen steps) instead of one per step. A request reserves them too (memory.HEADROOM).
GROW = 128


class _Buffered:
    """K/V written into a buffer grown GROW positions at a time (see the module docstring)."""

    keys: torch.Tensor | None
    values: torch.Tensor | None
    _buffer: tuple[torch.Tensor, torch.Tensor] | None = None
    _frozen = 0  # positions a snapshot took views of: never written in place again

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        assert self.keys is not None and self.values is not None  # lazily initialized before
        length, width = (self.keys.shape[-2] if self.keys.numel() else 0), keys.shape[-2]
        buffer = self._buffer
        owned = buffer is not None and self.keys.data_ptr() == buffer[0].data_ptr() and self.values.data_ptr() == buffer[1].data_ptr()
        if buffer is None or not owned or length + width > buffer[0].shape[-2] or length < self._frozen:
            grown = []
            for old, new in ((self.keys, keys), (self.values, values)):
                t = new.new_empty(*new.shape[:-2], length + width + GROW, new.shape[-1])
                if length:
                    t[..., :length, :] = old
                grown.append(t)
            buffer = self._buffer = (grown[0], grown[1])
            self._frozen = 0
        buffer[0][..., length : length + width, :] = keys
        buffer[1][..., length : length + width, :] = values
        self.keys, self.values = buffer[0][..., : length + width, :], buffer[1][..., : length + width, :]

    def freeze(self) -> None:
        """A snapshot holds views of every position this layer holds now: keep them as they are."""
        if self.keys is not None:
            self._frozen = max(self._frozen, self.keys.shape[-2])


class BufferedLayer(_Buffered, DynamicLayer):
    """transformers' dynamic layer, writing into a buffer instead of concatenating."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._append(key_states, value_states)
        assert self.keys is not None and self.values is not None
        return self.keys, self.values


class HistorySlidingLayer(_Buffered, DynamicSlidingWindowLayer):
    """A sliding-window layer that keeps its whole history, so `crop` is exact at any length, and
    hands attention only the window, as transformers' past-recording layer does."""

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__(sliding_window, **kwargs)
        self.record_past = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self._append(key_states, value_states)
        assert self.keys is not None and self.values is not None
        visible = self.sliding_window - 1 + key_states.shape[-2]
        return self.keys[..., -visible:, :], self.values[..., -visible:, :]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        assert self.keys is not None and self.values is not None  # set together on initialization
        self.keys = self.keys[..., :tokens_to_remove, :]
        self.values = self.values[..., :tokens_to_remove, :]
        self.cumulative_length = self.keys.shape[-2]


def kv_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The layers of a cache `new_cache` made: key/value layers only (transformers types `layers`
    as any of its layer kinds, linear-attention and placeholder ones too)."""
    return cast(list[DynamicLayer], cache.layers)


def layer_kv(cache: DynamicCache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values layer `i` holds (a layer a forward filled)."""
    layer = kv_layers(cache)[i]
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def new_cache(config, prefix: Sequence[LayerKV] | None = None, length: int = 0) -> DynamicCache:
    """An empty cache for a model config, or one holding the first `length` positions of `prefix`."""
    cache = DynamicCache(config=config)
    layers = kv_layers(cache)
    for i, layer in enumerate(layers):
        if isinstance(layer, DynamicSlidingWindowLayer):
            layers[i] = layer = HistorySlidingLayer(layer.sliding_window)
        elif type(layer) is DynamicLayer:
            layers[i] = layer = BufferedLayer()
        stored = prefix[i] if prefix is not None else None
        if stored is not None:
            keys, values = stored
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys[..., :length, :], values[..., :length, :]
            if isinstance(layer, HistorySlidingLayer):
                layer.cumulative_length = length
    return cache


def keep_then(x: torch.Tensor, length: int, then: int) -> torch.Tensor:
    """Keys or values (..., L, D) cut to their first `length` positions, then the one at index `then`
    (negative: from the end; one of the positions cut). A new tensor, as everywhere here."""
    return torch.cat([x[..., :length, :], x[..., then:, :][..., :1, :]], dim=-2)


def cache_keep_then(cache: DynamicCache, length: int, then: int) -> None:
    """`keep_then` on every layer of a cache."""
    for layer in kv_layers(cache):
        if not layer.is_initialized or layer.keys is None or layer.values is None:
            continue
        layer.keys, layer.values = keep_then(layer.keys, length, then), keep_then(layer.values, length, then)
        if isinstance(layer, HistorySlidingLayer):
            layer.cumulative_length = length + 1


def snapshot(cache: DynamicCache) -> list[LayerKV]:
    """The cache's tensors as they are now (safe to keep: the layers never write these positions again)."""
    for layer in kv_layers(cache):
        if isinstance(layer, _Buffered):
            layer.freeze()
    return [
        (layer.keys, layer.values) if layer.is_initialized and layer.keys is not None and layer.values is not None else None
        for layer in kv_layers(cache)
    ]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (comparisons run on tuple slices, in C)."""
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if tuple(a[lo:mid]) == tuple(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    layers: list[LayerKV]
    nbytes: int


class PrefixCache:
    """Recent requests' KV caches keyed by the token ids they hold, LRU within a byte budget.

    Entries live in namespaces (the target, a draft model), each with its own token history but
    one shared budget. `lookup` returns the longest stored prefix of a token sequence.
    """

    def __init__(self, budget_mb: float = DEFAULT_PREFIX_CACHE_MB):
        if budget_mb < 0:
            raise InvalidRequestError(f"prefix_cache_mb must be >= 0 (0 disables the prefix cache), got {budget_mb}.")
        self.budget_bytes = int(budget_mb * 2**20)
        self._entries: collections.OrderedDict[tuple[Hashable, int], _Entry] = collections.OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, namespace: Hashable, tokens: Sequence[int]) -> tuple[int, list[LayerKV] | None]:
        """(n, layers): the longest stored prefix `tokens[:n]` and the layers holding it, or (0, None)."""
        with self._lock:
            best_key, best_n = None, 0
            for key, entry in self._entries.items():
                if key[0] == namespace:
                    n = common_prefix_length(entry.tokens, tokens)
                    if n > best_n:
                        best_key, best_n = key, n
            if best_key is None:
                return 0, None
            self._entries.move_to_end(best_key)
            return best_n, self._entries[best_key].layers

    def insert(self, namespace: Hashable, tokens: Sequence[int], cache: DynamicCache) -> None:
        """Keep `cache`, which holds exactly `tokens`; entries it extends are dropped."""
        if not self.budget_bytes or not tokens:
            return
        layers = snapshot(cache)
        # What the entry keeps alive: its views' whole buffers (up to GROW positions more than it holds).
        nbytes = sum(k.untyped_storage().nbytes() + v.untyped_storage().nbytes() for k, v in filter(None, layers))
        if nbytes > self.budget_bytes:
            return
        tokens = tuple(tokens)
        with self._lock:
            for key, entry in self._entries.items():
                if key[0] == namespace and entry.tokens[: len(tokens)] == tokens:
                    self._entries.move_to_end(key)  # already held by a longer entry
                    return
            for key in [k for k, e in self._entries.items() if k[0] == namespace and tokens[: len(e.tokens)] == e.tokens]:
                self.nbytes -= self._entries.pop(key).nbytes
            self._entries[(namespace, self._next_id)] = _Entry(tokens, layers, nbytes)
            self._next_id += 1
            self.nbytes += nbytes
            while self.nbytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.nbytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
