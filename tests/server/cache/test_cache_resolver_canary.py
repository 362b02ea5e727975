"""RefResolver on weighted aliases: sticky routing by the documented sha256 bucket,
random without a key, weights following refresh, stale-if-error keeping the split,
and readers without weighted aliases serving the primary."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest

from adapterctl.errors import Unavailable
from adapterctl.refs import parse_ref
from adapterctl.registry import Route
from adapterctl.server.cache.resolver import RefResolver, canary_bucket


@dataclass(frozen=True)
class M:
    name: str
    version: int
    digest: str


def manifest(version: int) -> M:
    return M("chat", version, "sha256:" + f"{version:x}" * 64)


class RouteReader:
    """Serves chat:prod as ``route = (primary, canary, weight)``; ``down`` makes it unreachable."""

    def __init__(self) -> None:
        self.route, self.down, self.reads = (1, 2, 10.0), False, 0

    def resolve(self, ref):
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        return manifest(ref.version or self.route[0])

    def resolve_route(self, ref):
        self.reads += 1
        if self.down:
            raise Unavailable("registry down (test)")
        primary, canary, weight = self.route
        return Route(manifest(primary), manifest(canary) if canary else None, weight if canary else 0.0)


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_bucket_is_the_documented_sha256_fraction():
    key = "user-7"
    digest = hashlib.sha256(b"chat:prod\0user-7").digest()
    assert canary_bucket("chat:prod", key) == int.from_bytes(digest[:8], "big") / 2**64 * 100
    buckets = [canary_bucket("chat:prod", f"u{i}") for i in range(10_000)]
    assert all(0 <= b < 100 for b in buckets)
    assert abs(sum(b < 10 for b in buckets) / 100 - 10) < 1.0  # uniform enough for a 10 % split
    assert canary_bucket("chat:prod", "u1") != canary_bucket("chat:staging", "u1")  # independent per alias


def test_keys_stick_weights_follow_refresh_and_outages_keep_the_split():
    reader, clock = RouteReader(), Clock()
    resolver = RefResolver(reader, refresh_seconds=30, clock=clock)
    keys = [f"u{i}" for i in range(300)]
    first = {k: resolver.resolve("chat:prod", k).version for k in keys}
    assert first == {k: 2 if canary_bucket("chat:prod", k) < 10 else 1 for k in keys}
    assert reader.reads == 1  # one registry read, then the cached entry routes every key
    assert {k: resolver.cached("chat:prod", k).version for k in keys} == first
    assert {resolver.resolve("chat:prod").version for _ in range(200)} == {1, 2}  # random without a key
    assert resolver.aliases_of("chat", 2) == ("prod",) and resolver.route_role("chat:prod", 2) == "canary"
    assert resolver.route_role("chat:prod", 1) == "primary" and resolver.route_role("chat:2", 2) == ""

    reader.route = (1, 2, 60.0)
    assert resolver.refresh() == [("chat", "prod", 1, 1)]
    wider = {k: resolver.resolve("chat:prod", k).version for k in keys}
    assert all(wider[k] == 2 for k in keys if first[k] == 2)
    assert sum(v == 2 for v in wider.values()) > sum(v == 2 for v in first.values())

    reader.down, clock.now = True, 100.0  # stale entry, registry unreachable: keep routing as before
    assert {k: resolver.resolve("chat:prod", k).version for k in keys} == wider
    reader.down, reader.route = False, (2, None, 0.0)
    assert resolver.refresh() == [("chat", "prod", 1, 2)]
    assert {resolver.resolve("chat:prod", k).version for k in keys} == {2}


def test_a_reader_without_weighted_aliases_serves_the_primary():
    class PlainReader:
        def resolve(self, ref):
            return manifest(3)

    resolver = RefResolver(PlainReader(), refresh_seconds=30)
    assert {resolver.resolve("chat:prod", f"u{i}").version for i in range(50)} == {3}
    assert resolver.route_role("chat:prod", 3) == "primary"


@pytest.mark.parametrize("ref", ["chat", "chat:latest"])
def test_latest_is_never_weighted(ref):
    reader = RouteReader()
    resolver = RefResolver(reader, refresh_seconds=30)
    assert {resolver.resolve(ref, f"u{i}").version for i in range(50)} == {1}
