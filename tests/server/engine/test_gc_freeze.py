"""EngineConfig.gc_freeze: a started engine collects, then freezes what is alive, so full garbage
collections skip the model and libraries (server/engine/gc_heap.py says why); stop() gives the
freeze back, and the last engine to stop unfreezes."""
from __future__ import annotations

import gc
import weakref

import pytest

from adapterctl.server.engine import gc_heap


class _Node:
    """A GC-tracked object that can sit in a reference cycle and be weakly referenced."""

    other: object = None


def _tracked(obj: object) -> bool:
    """Whether ``obj`` is in generations 0-2, the ones collections walk (frozen objects are not)."""
    return any(o is obj for o in gc.get_objects())


@pytest.fixture(autouse=True)
def _no_freeze_before():
    """Every engine an earlier test started has given its hold back (a leak fails here, not skips)."""
    assert gc_heap.holds() == 0 and gc.get_freeze_count() == 0, "an engine left running holds a gc freeze"
    yield
    assert gc_heap.holds() == 0 and gc.get_freeze_count() == 0


def test_a_started_engine_freezes_what_is_alive_and_collects_garbage_first(make_engine):
    alive = _Node()
    gc.disable()  # no automatic collection: only the engine's own can reclaim the cycle
    try:
        garbage = _Node()
        garbage.other = garbage
        gone = weakref.ref(garbage)
        del garbage
        engine = make_engine(gc_freeze=True)
    finally:
        gc.enable()
    assert gone() is None, "the cycle left before start was frozen instead of collected"
    assert gc_heap.holds() == 1 and gc.get_freeze_count() > 0
    assert not _tracked(alive) and not _tracked(engine)
    later = _Node()
    assert _tracked(later), "objects made after start are collected as before"
    make_engine.loop.run_until_complete(engine.stop())
    assert gc_heap.holds() == 0 and gc.get_freeze_count() == 0 and _tracked(alive)


def test_the_last_engine_to_stop_unfreezes(make_engine):
    first, second = make_engine(gc_freeze=True), make_engine(gc_freeze=True)
    assert gc_heap.holds() == 2
    make_engine.loop.run_until_complete(first.stop())
    make_engine.loop.run_until_complete(first.stop())  # a second stop gives nothing back twice
    assert gc_heap.holds() == 1 and gc.get_freeze_count() > 0
    make_engine.loop.run_until_complete(second.stop())
    assert gc_heap.holds() == 0 and gc.get_freeze_count() == 0


def test_gc_freeze_off_leaves_the_collector_alone(make_engine):
    engine = make_engine(gc_freeze=False)
    assert gc_heap.holds() == 0 and gc.get_freeze_count() == 0 and _tracked(engine)


def test_release_without_hold_is_an_error():
    with pytest.raises(RuntimeError, match="without hold"):
        gc_heap.release()
