"""One thread-safe LRU with item and byte budgets, pins, refcounts and an eviction
callback; every adapter tier (device slots, host RAM, disk) is an instance of it."""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Iterator, TypeVar

from adapterctl.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    refs: int = 0
    pinned: bool = False

    @property
    def evictable(self) -> bool:
        return self.refs == 0 and not self.pinned


class LRUCache(Generic[K, V]):
    """Least-recently-used map bounded by ``max_items`` and ``max_bytes`` (None = unbounded).

    Invariants (held under one lock):
      * ``len(self) <= max_items`` and ``self.nbytes <= max_bytes`` at all times;
        ``sizeof(value)`` is taken once, at ``put``.
      * An entry with ``refcount(key) > 0`` (acquired) or ``is_pinned(key)`` is never
        evicted to make room; ``put`` evicts only the least recently used other
        entries and raises ResourceExhausted, evicting nothing, if even evicting all
        of them would not make the new value fit.
      * ``on_evict(key, value)`` runs exactly once for every value that leaves the
        cache (evicted, popped, replaced or cleared), in the calling thread, after
        the lock is released and before the call that removed it returns. So a tier
        can demote to, or clean up, another tier from the callback without extra
        bookkeeping, and the callback may call back into this cache.
    """

    def __init__(
        self,
        max_items: int | None = None,
        max_bytes: int | None = None,
        sizeof: Callable[[V], int] = lambda v: 0,
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        for name, limit in (("max_items", max_items), ("max_bytes", max_bytes)):
            if limit is not None and limit < 0:
                raise InvalidArgument(f"LRUCache {name} must be >= 0 or None, got {limit}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._on_evict = on_evict
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()  # LRU first, MRU last
        self._nbytes = 0
        self._lock = threading.RLock()

    # ---- reads -------------------------------------------------------------------
    def get(self, key: K) -> V | None:
        """The value, marked most recently used; None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry.value

    def peek(self, key: K) -> V | None:
        """The value without touching its recency; None when absent."""
        with self._lock:
            entry = self._entries.get(key)
            return None if entry is None else entry.value

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self.keys())

    def keys(self) -> list[K]:
        """A snapshot of the keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def items(self) -> list[tuple[K, V]]:
        """A snapshot of (key, value) pairs, least recently used first."""
        with self._lock:
            return [(k, e.value) for k, e in self._entries.items()]

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._nbytes

    def is_pinned(self, key: K) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.pinned

    def refcount(self, key: K) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return 0 if entry is None else entry.refs

    @property
    def pinned_count(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.pinned)

    # ---- writes ------------------------------------------------------------------
    def put(self, key: K, value: V, *, pin: bool = False, acquire: bool = False) -> None:
        """Insert or replace ``key`` as most recently used, evicting LRU entries that
        are neither pinned nor in use until both budgets hold.

        Replacing keeps the key's pin and refcount; replacing an in-use entry with a
        different value raises FailedPrecondition. Raises ResourceExhausted (and
        changes nothing) when the value cannot fit. ``pin`` / ``acquire`` pin the entry
        or take a reference in the same atomic step (no window for another put to
        evict it in between).
        """
        size = int(self._sizeof(value))
        if size < 0:
            raise InvalidArgument(f"sizeof returned a negative size ({size}) for {key!r}")
        removed: list[tuple[K, V]] = []
        with self._lock:
            old = self._entries.get(key)
            if old is not None and old.refs > 0 and old.value is not value:
                raise FailedPrecondition(f"cannot replace {key!r}: in use ({old.refs} references)")
            items_after = len(self._entries) + (0 if old is not None else 1)
            bytes_after = self._nbytes - (old.nbytes if old is not None else 0) + size
            victims: list[K] = []
            for k, entry in self._entries.items():
                if self._fits(items_after, bytes_after):
                    break
                if k == key or not entry.evictable:
                    continue
                victims.append(k)
                items_after -= 1
                bytes_after -= entry.nbytes
            if not self._fits(items_after, bytes_after):
                raise ResourceExhausted(self._exhausted_message(key, size))
            for k in victims:
                removed.append((k, self._remove_locked(k).value))
            if old is not None:
                self._nbytes -= old.nbytes
                if old.value is not value:
                    removed.append((key, old.value))
                old.value, old.nbytes = value, size
                self._entries.move_to_end(key)
            else:
                self._entries[key] = _Entry(value, size)
            self._nbytes += size
            entry = self._entries[key]
            entry.pinned = entry.pinned or pin
            entry.refs += int(acquire)
        self._notify(removed)

    def pop(self, key: K) -> V | None:
        """Remove ``key`` (pinned or not) and call ``on_evict``; None when absent.
        Raises FailedPrecondition when the entry is in use."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.refs > 0:
                raise FailedPrecondition(f"cannot remove {key!r}: in use ({entry.refs} references)")
            self._remove_locked(key)
        self._notify([(key, entry.value)])
        return entry.value

    def clear(self) -> None:
        """Remove every entry that is not in use (pinned ones included)."""
        with self._lock:
            keys = [k for k, e in self._entries.items() if e.refs == 0]
            removed = [(k, self._remove_locked(k).value) for k in keys]
        self._notify(removed)

    def acquire(self, key: K) -> V:
        """Take a reference (the entry cannot be evicted until released) and mark it
        most recently used; NotFound when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(f"{key!r} is not in the cache")
            entry.refs += 1
            self._entries.move_to_end(key)
            return entry.value

    def release(self, key: K) -> None:
        """Drop a reference taken by ``acquire``."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.refs == 0:
                raise FailedPrecondition(f"release({key!r}) without a matching acquire")
            entry.refs -= 1

    def pin(self, key: K) -> None:
        """Keep ``key`` resident until ``unpin`` (pins do not nest); NotFound when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                raise NotFound(f"{key!r} is not in the cache")
            entry.pinned = True

    def unpin(self, key: K) -> None:
        """Make ``key`` evictable again (no-op when absent or not pinned)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.pinned = False

    # ---- internals ---------------------------------------------------------------
    def _fits(self, items: int, nbytes: int) -> bool:
        return (self.max_items is None or items <= self.max_items) and (
            self.max_bytes is None or nbytes <= self.max_bytes
        )

    def _remove_locked(self, key: K) -> _Entry[V]:
        entry = self._entries.pop(key)
        self._nbytes -= entry.nbytes
        return entry

    def _exhausted_message(self, key: K, size: int) -> str:
        busy = sum(1 for e in self._entries.values() if not e.evictable)
        return (
            f"cannot cache {key!r} ({size} bytes): limits are {self.max_items} items / "
            f"{self.max_bytes} bytes, {len(self._entries)} cached using {self._nbytes} bytes, "
            f"{busy} pinned or in use"
        )

    def _notify(self, removed: list[tuple[K, V]]) -> None:
        if self._on_evict is None:
            return
        for key, value in removed:
            try:
                self._on_evict(key, value)
            except Exception:  # one failing cleanup must not skip the others
                log.exception("on_evict failed for %r", key)
