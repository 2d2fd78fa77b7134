"""Keep Python's full garbage collections off the owner thread's path: freeze the heap a loaded engine starts with.

A process that imported torch, transformers and LangChain holds about half a million objects the
cyclic collector tracks, and every collection of its oldest generation walks them all: 200-350 ms
on this 2-core CPU, with the GIL held, so every stream stalls while it runs. Those collections come
every few seconds while a request allocates (a first call, which compiles templates and imports
lazily, ran seven in a row), and they find nothing to free among objects that live as long as the
model. `gc.freeze()` moves what is alive after loading out of the collector's sight: the same full
collection then takes 1-6 ms (docs/research-notes.md, "Python's full collections"). vLLM, SGLang,
Ray Serve and TensorRT-LLM freeze their heaps after start-up for the same reason.

What is frozen is still freed by reference counting, but a reference cycle among frozen objects
is not collected while frozen, and a transformers model is such a cycle. So when an engine that
froze the heap is freed, the heap is thawed (`gc.unfreeze()`): everything becomes collectable
again, the dropped model included, and the next engine loaded freezes anew. Set
GEMMA_MTP_FREEZE_GC=0 to leave the collector as Python sets it.
"""

from __future__ import annotations

import gc
import os
import weakref

FREEZE_ENV = "GEMMA_MTP_FREEZE_GC"


def freeze_heap(owner: object) -> bool:
    """Freeze every object alive now until `owner` is freed (unless $GEMMA_MTP_FREEZE_GC is 0);
    whether it froze."""
    if os.environ.get(FREEZE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    gc.freeze()
    weakref.finalize(owner, gc.unfreeze)
    return True
