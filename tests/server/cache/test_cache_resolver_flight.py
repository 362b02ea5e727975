"""RefResolver under a thundering herd: threads missing the same ref at once share one
registry read (its answer or its error), other refs are not held up behind it, and a failed
read is not remembered."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from adapterctl.errors import NotFound, Unavailable
from adapterctl.refs import parse_ref
from adapterctl.server.cache.resolver import RefResolver

HERD = 8


@dataclass(frozen=True)
class M:
    name: str
    version: int
    digest: str


class GatedReader:
    """Resolves ``NAME`` / ``NAME:N`` to version 3 (N); reads of ``chat`` wait for ``gate``."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.reads: list[str] = []
        self.fail: Exception | None = None
        self._lock = threading.Lock()

    def resolve(self, ref):
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        with self._lock:
            self.reads.append(ref.name)
        if ref.name == "chat":
            assert self.gate.wait(30), "test never opened the gate"
        if self.fail is not None:
            raise self.fail
        version = ref.version or 3
        return M(ref.name, version, "sha256:" + f"{version:x}" * 64)


def until(predicate, timeout: float = 30.0) -> bool:
    """Bounded wait for a condition other threads make true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def herd(resolver: RefResolver, reader: GatedReader, ref: str) -> list:
    """HERD threads resolve ``ref`` at once; the gate opens once all but one wait on the
    one reading. Returns each thread's manifest or exception."""
    def one():
        try:
            return resolver.resolve(ref)
        except Exception as exc:  # noqa: BLE001 - the test compares what each thread got
            return exc

    with ThreadPoolExecutor(HERD) as pool:
        futures = [pool.submit(one) for _ in range(HERD)]
        joined = until(lambda: resolver.waiting(ref) == HERD - 1)
        reader.gate.set()
        results = [f.result(timeout=30) for f in futures]
    assert joined, f"only {resolver.waiting(ref)} of {HERD - 1} threads joined the read in flight"
    return results


@pytest.mark.parametrize("ref", ["chat", "chat:prod", "chat:5"])
def test_a_herd_on_one_ref_costs_one_registry_read(ref):
    reader = GatedReader()
    resolver = RefResolver(reader, refresh_seconds=30)
    results = herd(resolver, reader, ref)
    assert reader.reads == ["chat"]
    assert len({(m.name, m.version, m.digest) for m in results}) == 1
    assert resolver.cached(ref) == results[0]  # recorded once, by the thread that read
    assert resolver.waiting(ref) == 0


def test_other_refs_are_not_held_up_behind_a_read_in_flight():
    reader = GatedReader()
    resolver = RefResolver(reader, refresh_seconds=30)
    with ThreadPoolExecutor(1) as pool:
        stuck = pool.submit(resolver.resolve, "chat")
        assert until(lambda: reader.reads == ["chat"])
        assert resolver.resolve("mail").name == "mail"  # while chat's read still waits
        assert not stuck.done()
        reader.gate.set()
        assert stuck.result(timeout=30).version == 3


@pytest.mark.parametrize("error", [Unavailable("registry down (test)"), NotFound("no adapter chat (test)")])
def test_a_failed_read_reaches_the_whole_herd_and_is_not_remembered(error):
    reader = GatedReader()
    reader.fail = error
    resolver = RefResolver(reader, refresh_seconds=30)
    results = herd(resolver, reader, "chat")
    assert reader.reads == ["chat"]
    assert all(type(r) is type(error) for r in results), results
    reader.fail = None
    assert resolver.resolve("chat").version == 3  # the next miss reads again
    assert reader.reads == ["chat", "chat"]
