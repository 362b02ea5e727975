"""One OpenMP thread pool for the engine's compute: the decode thread's.

libgomp (the OpenMP runtime torch, oneDNN and this package's C kernels share) gives every OS
thread that opens a parallel region a pool of worker threads of its own, kept until that thread
exits. While the pools together hold more threads than there are CPUs, libgomp stops spinning
between parallel regions and parks its workers on a futex instead, so every region pays a
wake-up. A decode step opens a few hundred regions; on the 2-core AMX host one prepacked bf16
GEMV measured 52 us on the only pool and 150-170 us once another thread had one, and a whole
one-row bf16 step 30 ms against 38 ms (a scratch measurement; ``bench/`` reports the engine).

So the engine loads and computes on its decode thread alone: the thread that starts it gives
its pool back (:func:`release_pool`), and its helper threads (adapter loads) run torch serially
(:func:`serial_thread`), opening no pool.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the calling thread's pool and its threads


@functools.cache
def libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded, or None (not Linux, a torch without it, or several copies mapped
    and none of them torch's). Other wheels vendor their own under other names (sentencepiece's
    ``libgomp-<hash>.so``): pausing that one would leave torch's pool alone."""
    torch.get_num_threads()  # torch loads its OpenMP runtime at first use
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and line.split()[-1].startswith("/")}
    except OSError:
        return None
    own = [p for p in paths if Path(p).parent == Path(torch.__file__).parent / "lib"]
    path = own[0] if own else next(iter(paths)) if len(paths) == 1 else None
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    return lib if hasattr(lib, "omp_pause_resource_all") and hasattr(lib, "omp_set_num_threads") else None


def release_pool() -> bool:
    """Free the calling thread's OpenMP pool (its worker threads exit); a later parallel region on
    this thread makes a new one. False where there is no libgomp or it refused (inside a region)."""
    lib = libgomp()
    return lib is not None and lib.omp_pause_resource_all(OMP_PAUSE_HARD) == 0


def serial_thread() -> None:
    """Make torch run serially on the calling thread (a helper thread: it then opens no OpenMP
    pool). Other threads keep their own setting: OpenMP's thread count is per thread, and torch
    sets a thread's count at its first parallel op, so that happens first here."""
    lib = libgomp()
    if lib is None:
        return
    torch.get_num_threads()  # torch's per-thread initialisation, which would undo the line below
    lib.omp_set_num_threads(1)
