"""Weighted canary aliases on a real server (batching engine, tiny model, loopback):
a 90/10 split over 2,000 routing keys, sticky per key, weights and promotion /
rollback taking effect without a restart, in-flight requests finishing on the
version they started on, and the per-alias-version metrics."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from adapterctl.server.cache.resolver import canary_bucket

KEYS = [f"user-{i}" for i in range(2000)]
WORKERS = 8


@pytest.fixture(scope="module")
def canary_registry(tmp_path_factory, make_adapter):
    from adapterctl.registry import open_registry

    reg = open_registry(f"file://{tmp_path_factory.mktemp('canary-registry')}")
    for seed in (21, 22, 23):
        reg.publish(make_adapter(f"chat{seed}", seed=seed), "chat")
    reg.promote("chat", 1, "prod")
    reg.promote("chat", 2, "prod", canary=10)
    return reg


@pytest.fixture(scope="module")
def canary_server(canary_registry, start_batched):
    return start_batched(canary_registry.uri, max_running_requests=WORKERS)


@pytest.fixture
def canary_client(canary_server):
    from adapterctl.client import Client

    with Client(canary_server.address, timeout=120) as c:
        yield c


def versions_for(client, keys) -> dict[str, int]:
    """``{routing key: version that served it}``, WORKERS requests at a time."""
    def one(key):
        return key, client.generate("Hi", adapter="chat:prod", max_new_tokens=1, routing_key=key).adapter.version

    with ThreadPoolExecutor(WORKERS) as pool:
        return dict(pool.map(one, keys))


def share(versions: dict[str, int], version: int) -> float:
    return 100.0 * sum(v == version for v in versions.values()) / len(versions)


def test_ninety_ten_split_is_sticky_and_follows_the_registry(canary_client, canary_registry, metrics_of,
                                                             canary_server):
    first = versions_for(canary_client, KEYS)
    assert set(first.values()) == {1, 2}
    canary_share = share(first, 2)
    print(f"canary split over {len(KEYS)} routing keys: v1 {100 - canary_share:.2f}% / v2 {canary_share:.2f}%")
    assert abs(canary_share - 10.0) <= 3.0
    # The choice is the stable hash, so any process or replica computes the same.
    assert first == {k: 2 if canary_bucket("chat:prod", k) < 10 else 1 for k in KEYS}
    again = versions_for(canary_client, KEYS[:400][::-1])
    assert again == {k: first[k] for k in KEYS[:400]}

    # Raise the weight in the registry: the server follows at RefreshAliases, no restart;
    # keys already on the canary stay there (the buckets under 10 are under 50 too).
    canary_registry.promote("chat", 2, "prod", canary=50)
    assert [(c.old_version, c.new_version) for c in canary_client.refresh_aliases()] == [(1, 1)]
    half = versions_for(canary_client, KEYS[:600])
    assert abs(share(half, 2) - 50.0) <= 6.0
    assert all(half[k] == 2 for k in KEYS[:600] if first[k] == 2)

    # Promote the canary: all traffic to v2; roll back: all to v1 again.
    canary_registry.promote("chat", 2, "prod")
    canary_client.refresh_aliases()
    assert set(versions_for(canary_client, KEYS[:100]).values()) == {2}
    canary_registry.rollback("chat", "prod")
    canary_client.refresh_aliases()
    assert set(versions_for(canary_client, KEYS[:100]).values()) == {1}

    # A canary, then rollback drops it: back to v1 only.
    canary_registry.promote("chat", 3, "prod", canary=10)
    canary_client.refresh_aliases()
    assert set(versions_for(canary_client, KEYS[:200]).values()) == {1, 3}
    canary_registry.rollback("chat", "prod")
    canary_client.refresh_aliases()
    assert set(versions_for(canary_client, KEYS[:200]).values()) == {1}

    # Without a routing key the choice is random per request (same prompt, both versions).
    canary_registry.promote("chat", 2, "prod", canary=50)
    canary_client.refresh_aliases()
    with ThreadPoolExecutor(WORKERS) as pool:
        keyless = list(pool.map(lambda _: canary_client.generate("Hi", adapter="chat:prod", max_new_tokens=1)
                                .adapter.version, range(60)))
    assert set(keyless) == {1, 2}

    samples = metrics_of(canary_server.server.metrics_port)
    per_version = {(dict(labels)["version"], dict(labels)["role"]): value for (name, labels), value in samples.items()
                   if name == "adapterctl_alias_requests_total" and dict(labels)["alias"] == "prod"
                   and dict(labels)["code"] == "OK"}
    for (version, role), value in sorted(per_version.items()):
        print(f'adapterctl_alias_requests_total{{adapter="chat",alias="prod",version="{version}",role="{role}",'
              f'code="OK"}} {value:g}')
    assert per_version[("2", "canary")] >= sum(v == 2 for v in first.values())
    assert per_version[("1", "primary")] >= sum(v == 1 for v in first.values())
    assert per_version[("3", "canary")] >= 1
    for (name, labels), value in sorted(samples.items()):
        if name.startswith(("adapterctl_alias_request_duration_seconds_", "adapterctl_alias_time_to_first_token")) \
                and name.endswith(("_sum", "_count")) and dict(labels)["alias"] == "prod":
            print(f"{name}{{{','.join(f'{k}={v!r}' for k, v in labels)}}} {value:g}")
    counts = {dict(labels)["version"]: value for (name, labels), value in samples.items()
              if name == "adapterctl_alias_time_to_first_token_seconds_count" and dict(labels)["alias"] == "prod"}
    assert counts["1"] > 0 and counts["2"] > 0


def test_in_flight_requests_finish_on_the_version_they_started_on(canary_client, canary_registry):
    canary_registry.promote("chat", 1, "prod")
    canary_client.refresh_aliases()
    key = "in-flight-user"
    stream = canary_client.generate_stream("Once upon a time", adapter="chat:prod", max_new_tokens=1500,
                                           routing_key=key)
    chunks = iter(stream)
    next(chunks)  # admitted and running on v1
    canary_registry.promote("chat", 3, "prod")
    assert [(c.old_version, c.new_version) for c in canary_client.refresh_aliases()] == [(1, 3)]
    assert canary_client.generate("Hi", adapter="chat:prod", max_new_tokens=1, routing_key=key).adapter.version == 3
    running = {r.version: r.active_requests for r in canary_client.list_adapters("chat") if r.tier == "device"}
    assert running.get(1, 0) == 1, running  # the stream is still generating on v1 while v3 serves new requests
    list(chunks)
    assert stream.result.adapter.version == 1
