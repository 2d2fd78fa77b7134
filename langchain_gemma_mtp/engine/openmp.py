"""Hand back the calling thread's idle OpenMP team, so the owner thread's team is the only one.

PyTorch's CPU wheels on Linux run their parallel ops on GNU libgomp, which gives every thread that
runs one a team of its own (pool threads, parked between ops) and keeps it while that thread lives.
Once the threads of all teams outnumber the cores, libgomp spins only 100 turns before a pool thread
sleeps on a futex (`do_spin` in libgomp's config/linux/wait.h; no environment setting lifts that
throttle), so every small op of the engine pays a wake-up: a decode token of the 270M 1.2x as long.
A user's own torch work on the thread that calls the engine (a notebook's or an agent's main thread)
is the common source, and the one the engine can undo: `omp_pause_resource_all` frees the calling
thread's own pool (`gomp_pause_host` in libgomp's team.c), and that thread's next parallel op builds
a new one, at the cost of starting one thread per pool slot.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

_OMP_PAUSE_SOFT = 1  # omp_pause_soft: free the threads, keep the settings (ICVs) as they are


@functools.cache
def _pause_all() -> Callable[[int], int] | None:
    """libgomp's `omp_pause_resource_all`, if the process runs GNU libgomp (None for any other OpenMP
    runtime, e.g. LLVM's or Intel's, whose pause is process-wide, or on a system without /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith("libgomp") and os.path.exists(path):
            pause = ctypes.CDLL(path).omp_pause_resource_all  # already loaded: the same library torch uses
            pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
            return pause
    return None


def release_thread_team() -> bool:
    """Free the OpenMP pool threads the calling thread keeps from its own parallel ops, if any.

    True when GNU libgomp was asked (a thread without a team returns at once); False where the
    process uses another OpenMP runtime or none. The thread's own next parallel op starts its
    pool again. Call it on a thread that stays alive after torch work of its own (the engine
    does so on every thread that submits to it or waits for a burst)."""
    pause = _pause_all()
    return pause is not None and pause(_OMP_PAUSE_SOFT) == 0
