"""Single flight: concurrent callers asking for the same key share one call of the work.

The first caller of ``do(key, fn)`` runs ``fn``; callers arriving while it runs block and
get its result, or its exception. Once it returns, the next ``do(key, ...)`` runs ``fn`` again
(results are not cached here: the caller's cache sits in front)."""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Flight(Generic[T]):
    def __init__(self) -> None:
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.waiters = 0  # callers blocked on ``future`` (not counting the one running the work)


class SingleFlight(Generic[K, T]):
    """Thread-safe; blocking (call from worker threads, not from an event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[K, _Flight[T]] = {}

    def do(self, key: K, fn: Callable[[], T]) -> tuple[T, bool]:
        """``(fn()'s result, True)`` for the caller that ran it, ``(the same result, False)`` for
        those that joined while it ran. An exception of ``fn`` is raised to all of them."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
            else:
                flight.waiters += 1
        if not leader:
            return flight.future.result(), False
        try:
            result = fn()
        except BaseException as exc:
            flight.future.set_exception(exc)
            raise
        else:
            flight.future.set_result(result)
            return result, True
        finally:
            with self._lock:
                del self._flights[key]

    def waiters(self, key: K) -> int:
        """Callers blocked on the call now running for ``key`` (0 when none runs)."""
        with self._lock:
            flight = self._flights.get(key)
            return flight.waiters if flight is not None else 0
