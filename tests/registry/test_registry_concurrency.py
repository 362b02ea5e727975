"""Races: concurrent publishers claim distinct versions; concurrent promotions never
silently lose an update. Both backends."""
from __future__ import annotations

import multiprocessing
import queue

import registry_testkit

PUBLISHERS = 8


def test_concurrent_publishers_get_versions_1_to_8_exactly_once(registry, registry_uri, adapter_dir):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(PUBLISHERS), ctx.Queue()
    procs = [
        ctx.Process(
            target=registry_testkit.publish_worker, args=(registry_uri, str(adapter_dir), "race", barrier, results)
        )
        for _ in range(PUBLISHERS)
    ]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in procs]
    except queue.Empty:
        outcomes = []
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    assert [kind for kind, _ in outcomes] == ["ok"] * PUBLISHERS, outcomes
    assert sorted(v for _, v in outcomes) == list(range(1, PUBLISHERS + 1))
    manifests = registry.list_versions("race")
    assert [m.version for m in manifests] == list(range(1, PUBLISHERS + 1))
    first = manifests[0]
    for m in manifests:
        assert (
            m.name == "race" and m.files == first.files and m.lora == first.lora and m.total_bytes == first.total_bytes
        )
        assert registry.resolve(f"race@{m.digest}") == m
