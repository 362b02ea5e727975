"""Keep the objects alive at startup out of the cyclic GC's full collections (``gc.freeze``).

A served process holds a few hundred thousand GC-tracked objects that live as long as it does:
the model's modules and parameters, the tokenizer, torch's and transformers' module state. A full
(generation 2) collection walks all of them while holding the GIL, so every thread stops, the
decode thread between its kernels included. Measured on Gemma 3 270M with a started engine
(2-vCPU AMD EPYC): 391k objects, a full collection 311-536 ms; after ``gc.freeze()``, under 1 ms.
CPython starts one on its own whenever the objects that survived into generation 2 since the last
grow by a quarter: in one full ``bench.run`` one fell inside p5's ~4 minutes of serving (585 ms),
none inside p3's 5 minutes in four runs. Rare, but each stalls every stream.

So the engine, once loaded, collects and then freezes: everything alive moves to the permanent
generation, which collections skip; objects made later are tracked and collected as before.
Frozen garbage would never be reclaimed, hence the collection first. The freeze is process-wide:
engines in one process count their holds, and the last :func:`release` unfreezes.
"""
from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()
_holds = 0


def hold() -> int:
    """Collect, then freeze every object alive; count one hold. Returns the frozen count."""
    global _holds
    with _lock:
        began = time.perf_counter()
        gc.collect()
        gc.freeze()
        _holds += 1
        frozen = gc.get_freeze_count()
    log.info("gc: froze %d startup objects (%.0f ms); full collections skip them", frozen,
             1e3 * (time.perf_counter() - began))
    return frozen


def release() -> None:
    """Drop one hold; the last one unfreezes (the objects go back to the oldest generation)."""
    global _holds
    with _lock:
        if _holds == 0:
            raise RuntimeError("gc_heap.release() without hold()")
        _holds -= 1
        if _holds == 0:
            gc.unfreeze()


def holds() -> int:
    """Holds taken and not released (engines started with ``gc_freeze`` and not stopped)."""
    return _holds
