"""What a request's KV cache will hold, and the budget that live requests share.

A request reserves, before any forward, the KV cache it can grow to: (prompt + max_new_tokens +
HEADROOM) positions times the bytes per position of every layer that stores K/V
(kv-shared layers store none). Sliding-window layers are counted at full length because they
are: `cache.HistorySlidingLayer` keeps a live request's whole history so that rollback and the
prefix cache stay exact at any length (see docs/server.md, "Limits"). A request larger than the
whole budget is refused at once (KVCacheLimitError); one that does not fit beside the requests
running now waits its turn in the owner thread's queue. The prefix cache (`PrefixCache`) holds
finished requests' caches under its own budget; the two together bound the engine's KV memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from ..draft_settings import MAX_DRAFT_TOKENS, MAX_MTP_SIBLINGS
from ..errors import KVCacheLimitError
from .cache import GROW
from .target import TargetModel

MB = 2**20
# Positions a verification forward appends before rollback: the pending token and the largest
# draft tree (a chain of MAX_DRAFT_TOKENS with MAX_MTP_SIBLINGS runners-up at every depth).
VERIFY_BLOCK = 1 + MAX_DRAFT_TOKENS * (1 + MAX_MTP_SIBLINGS)
# Positions a live cache may hold beyond prompt + max_new_tokens: that block, and what a layer's
# buffer grows by past it (cache.GROW).
HEADROOM = VERIFY_BLOCK + GROW
# Share of the memory free at load time that live KV caches may take by default: the rest is
# left for activations, the prefix cache and whatever else the process holds.
DEFAULT_SHARE = 0.5
FALLBACK_MB = 4096  # when the free memory cannot be read


def kv_bytes_per_position(model: TargetModel) -> int:
    """Bytes of K and V one position adds to a cache of this model, over all its layers."""
    total = 0
    for layer, cached in zip(model.decoder.layers, model.new_cache().layers):
        if not isinstance(cached, DynamicLayer):  # a kv-shared layer reads another layer's K/V
            continue
        attention = layer.self_attn
        keys = attention.k_proj.out_features
        values = attention.v_proj.out_features if getattr(attention, "v_proj", None) is not None else keys
        total += (keys + values) * model.dtype.itemsize
    return total


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory free on the device now (CUDA), or available to the process (CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_kv_cache_mb(device: torch.device, prefix_cache_mb: float, pending_bytes: int = 0) -> float:
    """Half the memory free when the model has loaded, less what loading is still to take
    (`pending_bytes`: the greedy screen's copy while it packs) and the prefix cache's budget (at least 64 MB)."""
    free = free_memory_bytes(device)
    if free is None:
        return FALLBACK_MB
    return max(64.0, (free - pending_bytes) * DEFAULT_SHARE / MB - prefix_cache_mb)


@dataclass
class KVBudget:
    """Bytes of KV cache the running requests of one engine may hold together.

    Only the device's owner thread takes and gives back (under its lock); `held` is read by metrics.
    """

    limit_bytes: int
    held: int = 0

    def check(self, nbytes: int, prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise KVCacheLimitError for a request that could not run even alone."""
        if nbytes > self.limit_bytes:
            per = nbytes / (prompt_tokens + max_new_tokens + HEADROOM)
            room = int(self.limit_bytes / per) - HEADROOM - prompt_tokens
            fix = f"ask for at most {room} max_tokens" if room > 0 else "shorten the prompt"
            raise KVCacheLimitError(
                f"this request needs {nbytes / MB:.1f} MB of KV cache ({prompt_tokens} prompt tokens + {max_new_tokens} "
                f"max_tokens), over the engine's limit of {self.limit_bytes / MB:.1f} MB for all running requests: "
                f"{fix}, or raise the limit (kv_cache_mb=, `gemma-mtp serve --kv-cache-mb`)."
            )

    def take(self, nbytes: int) -> bool:
        """Reserve `nbytes` if they fit beside what running requests hold now."""
        if self.held + nbytes > self.limit_bytes:
            return False
        self.held += nbytes
        return True

    def give_back(self, nbytes: int) -> None:
        self.held -= nbytes
