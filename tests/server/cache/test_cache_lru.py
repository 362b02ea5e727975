"""LRUCache: eviction order, item and byte budgets, pins, refcounts, callbacks, threads."""
from __future__ import annotations

import threading

import pytest

from adapterctl.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from adapterctl.server.lru import LRUCache


def _sized(max_items=None, max_bytes=None):
    evicted: list[tuple[str, int]] = []
    cache: LRUCache[str, int] = LRUCache(
        max_items, max_bytes, sizeof=lambda v: v, on_evict=lambda k, v: evicted.append((k, v))
    )
    return cache, evicted


def test_evicts_least_recently_used_by_items():
    cache, evicted = _sized(max_items=2)
    cache.put("a", 1)
    cache.put("b", 1)
    assert cache.get("a") == 1  # touch: b is now LRU
    cache.put("c", 1)
    assert evicted == [("b", 1)]
    assert cache.keys() == ["a", "c"]
    assert len(cache) == 2 and "b" not in cache


def test_peek_and_contains_do_not_touch():
    cache, evicted = _sized(max_items=2)
    cache.put("a", 1)
    cache.put("b", 1)
    assert cache.peek("a") == 1 and "a" in cache
    cache.put("c", 1)
    assert evicted == [("a", 1)]
    assert cache.get("missing") is None and cache.peek("missing") is None


def test_byte_budget_evicts_as_many_as_needed_in_lru_order():
    cache, evicted = _sized(max_bytes=100)
    cache.put("a", 30)
    cache.put("b", 30)
    cache.put("c", 40)
    assert cache.nbytes == 100
    cache.put("d", 50)  # needs a (30) and b (30) gone
    assert evicted == [("a", 30), ("b", 30)]
    assert cache.keys() == ["c", "d"] and cache.nbytes == 90
    cache.put("e", 10)  # fits exactly
    assert evicted == [("a", 30), ("b", 30)] and cache.nbytes == 100


def test_both_budgets_apply():
    cache, evicted = _sized(max_items=3, max_bytes=10)
    for key in "abc":
        cache.put(key, 1)
    cache.put("d", 1)  # item budget
    assert evicted == [("a", 1)]
    cache.put("e", 8)  # byte budget: 3 + 8 > 10 -> evict b only
    assert [k for k, _ in evicted] == ["a", "b"]
    assert cache.keys() == ["c", "d", "e"] and cache.nbytes == 10


def test_pinned_and_in_use_entries_are_skipped():
    cache, evicted = _sized(max_bytes=100)
    cache.put("pinned", 30)
    cache.put("used", 30)
    cache.put("free", 30)
    cache.pin("pinned")
    assert cache.acquire("used") == 30
    cache.put("new", 40)
    assert evicted == [("free", 30)]
    assert set(cache.keys()) == {"pinned", "used", "new"}
    assert cache.is_pinned("pinned") and cache.refcount("used") == 1 and cache.pinned_count == 1


def test_resource_exhausted_changes_nothing():
    cache, evicted = _sized(max_bytes=100)
    cache.put("pinned", 60)
    cache.pin("pinned")
    cache.put("free", 30)
    with pytest.raises(ResourceExhausted, match="pinned or in use"):
        cache.put("big", 50)  # even evicting "free" leaves 60 + 50 > 100
    assert evicted == [] and cache.keys() == ["pinned", "free"] and cache.nbytes == 90
    with pytest.raises(ResourceExhausted):
        cache.put("huge", 101)  # larger than the whole budget
    zero, _ = _sized(max_items=0)
    with pytest.raises(ResourceExhausted):
        zero.put("a", 0)


def test_release_and_unpin_make_entries_evictable_again():
    cache, evicted = _sized(max_items=1)
    cache.put("a", 1)
    cache.acquire("a")
    cache.acquire("a")
    cache.release("a")
    with pytest.raises(ResourceExhausted):
        cache.put("b", 1)
    cache.release("a")
    cache.pin("a")
    with pytest.raises(ResourceExhausted):
        cache.put("b", 1)
    cache.unpin("a")
    cache.put("b", 1)
    assert evicted == [("a", 1)] and cache.keys() == ["b"]


def test_put_can_pin_or_acquire_atomically():
    cache, evicted = _sized(max_items=2)
    cache.put("a", 1, pin=True)
    cache.put("b", 1, acquire=True)
    with pytest.raises(ResourceExhausted):
        cache.put("c", 1)
    assert cache.is_pinned("a") and cache.refcount("b") == 1 and evicted == []
    cache.release("b")
    cache.put("c", 1)
    assert evicted == [("b", 1)]


def test_acquire_release_pin_errors():
    cache, _ = _sized()
    with pytest.raises(NotFound):
        cache.acquire("x")
    with pytest.raises(NotFound):
        cache.pin("x")
    cache.put("a", 1)
    with pytest.raises(FailedPrecondition):
        cache.release("a")
    cache.unpin("x")  # no-op
    with pytest.raises(InvalidArgument):
        LRUCache(max_items=-1)


def test_pop_calls_on_evict_and_refuses_in_use():
    cache, evicted = _sized()
    cache.put("a", 5)
    cache.pin("a")
    assert cache.pop("a") == 5  # explicit removal ignores the pin
    assert evicted == [("a", 5)] and cache.nbytes == 0
    assert cache.pop("a") is None
    cache.put("b", 1)
    cache.acquire("b")
    with pytest.raises(FailedPrecondition, match="in use"):
        cache.pop("b")
    assert "b" in cache


def test_replace_calls_on_evict_for_old_value_and_keeps_pin():
    cache, evicted = _sized(max_bytes=10)
    cache.put("a", 4)
    cache.pin("a")
    cache.put("a", 6)
    assert evicted == [("a", 4)] and cache.nbytes == 6 and cache.is_pinned("a")
    same = object()
    objs: LRUCache[str, object] = LRUCache(on_evict=lambda k, v: evicted.append((k, v)))
    objs.put("x", same)
    objs.acquire("x")
    objs.put("x", same)  # same object while in use: just a touch
    with pytest.raises(FailedPrecondition):
        objs.put("x", object())
    assert evicted == [("a", 4)]


def test_replace_does_not_evict_itself_to_fit():
    cache, evicted = _sized(max_bytes=10)
    cache.put("a", 5)
    cache.put("b", 5)
    cache.put("a", 8)  # grows: b must go, a's old value leaves by replacement
    assert evicted == [("b", 5), ("a", 5)] and cache.keys() == ["a"] and cache.nbytes == 8


def test_clear_keeps_in_use():
    cache, evicted = _sized()
    for key in "abc":
        cache.put(key, 1)
    cache.acquire("b")
    cache.pin("c")
    cache.clear()
    assert cache.keys() == ["b"] and sorted(k for k, _ in evicted) == ["a", "c"]


def test_callback_failure_does_not_skip_others(caplog):
    seen = []

    def on_evict(key, value):
        seen.append(key)
        if key == "a":
            raise RuntimeError("boom")

    cache: LRUCache[str, int] = LRUCache(max_items=1, on_evict=on_evict)
    cache.put("a", 1)
    cache.put("b", 1)
    cache.put("c", 1)
    assert seen == ["a", "b"] and "on_evict failed" in caplog.text


def test_tiers_chain_through_callbacks():
    """Evicting from the host tier demotes to the disk tier; evicting there cleans up."""
    removed: list[str] = []
    disk: LRUCache[str, int] = LRUCache(max_items=2, sizeof=lambda v: v, on_evict=lambda k, v: removed.append(k))
    host: LRUCache[str, int] = LRUCache(max_items=1, sizeof=lambda v: v, on_evict=lambda k, v: disk.put(k, v))
    for key in "abcd":
        host.put(key, 1)
    assert host.keys() == ["d"] and disk.keys() == ["b", "c"] and removed == ["a"]


def test_callback_may_reenter_the_same_cache():
    log: list[tuple[str, bool]] = []
    cache: LRUCache[str, int] = LRUCache(max_items=2, on_evict=lambda k, v: log.append((k, cache.get(k) is not None)))
    cache.put("a", 1)
    cache.put("b", 1)
    cache.put("c", 1)
    assert log == [("a", False)]


def test_thread_safety_budget_holds_under_contention():
    cache, evicted = _sized(max_items=8, max_bytes=40)
    barrier = threading.Barrier(4, timeout=10)
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            barrier.wait()
            for i in range(300):
                key = f"{tid}-{i % 20}"
                cache.put(key, 1 + (i % 5))
                if cache.get(key) is not None:
                    try:
                        cache.acquire(key)
                        cache.release(key)
                    except NotFound:
                        pass  # evicted by another thread in between
                assert len(cache) <= 8 and cache.nbytes <= 40
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert cache.nbytes == sum(v for _, v in cache.items()) <= 40
    assert len(cache) <= 8
