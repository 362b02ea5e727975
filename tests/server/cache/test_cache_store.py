"""AdapterStore over a fake registry: tiers, single-flight, failures that cache nothing,
alias hot reload, pins, status rows and observer metrics."""
from __future__ import annotations

import asyncio
import threading

import pytest

from adapterctl.errors import FailedPrecondition, IntegrityError, NotFound, ResourceExhausted, Unavailable
from adapterctl.server.cache.config import AdapterStoreConfig
from adapterctl.server.cache.store import AdapterStore
from adapterctl.server.types import ServedAdapter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def new_store(tiny_base, fake_registry, observer, clock, tmp_path):
    stores: list[AdapterStore] = []

    def make(**overrides) -> AdapterStore:
        overrides.setdefault("cache_dir", tmp_path / "disk")
        rank = overrides.pop("max_lora_rank", 64)
        store = AdapterStore(AdapterStoreConfig(**overrides), fake_registry, tiny_base, observer, max_lora_rank=rank,
                             clock=clock)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def published(make_adapter, fake_registry, tiny_base):
    """Three one-version adapters a, b, c (distinct weights) in the fake registry."""
    return {n: fake_registry.publish(n, make_adapter(n, seed=i), tiny_base.fingerprint) for i, n in enumerate("abc")}


def _served(m) -> ServedAdapter:
    return ServedAdapter(m.name, m.version, m.digest)


def _disk_dirs(store):
    return sorted(p.name for p in store.config.cache_dir.iterdir())


def test_cold_get_pulls_then_hits_host(new_store, published, fake_registry, observer):
    store = new_store()

    async def go():
        served = await store.resolve("a")
        first = await store.get(served)
        second = await store.get(served)
        return served, first, second

    served, first, second = asyncio.run(go())
    assert served == _served(published["a"]) and first is second and first.served == served
    assert fake_registry.pulls[served.digest] == 1
    assert observer.cache == [
        ("host", "miss", "a"),
        ("disk", "miss", "a"),
        ("registry", "hit", "a"),
        ("host", "hit", "a"),
    ]
    assert [(s, n) for s, _, n in observer.loads] == [("registry", "a")] and observer.loads[0][1] > 0
    assert observer.residency["host"] == (1, first.nbytes, 0) and observer.residency["disk"][0] == 1
    assert _disk_dirs(store) == [served.digest.split(":")[1]]


def test_concurrent_cold_gets_share_one_pull(new_store, published, fake_registry, observer):
    store = new_store()
    fake_registry.gate = threading.Event()
    served = _served(published["a"])
    n = 8

    async def go():
        tasks = [asyncio.create_task(store.get(served)) for _ in range(n)]
        # every get has missed the host tier and joined the (gated) load
        assert await asyncio.to_thread(observer.wait_for, lambda o: o.count("host", "miss") == n)
        assert not any(t.done() for t in tasks)
        fake_registry.gate.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)

    results = asyncio.run(go())
    assert fake_registry.pulls[served.digest] == 1 and len(observer.loads) == 1
    assert all(r is results[0] for r in results)


def test_loading_never_blocks_the_event_loop(new_store, published, fake_registry):
    store = new_store()
    hot, cold = _served(published["a"]), _served(published["b"])

    async def go():
        await store.get(hot)
        fake_registry.gate = threading.Event()
        fake_registry.pull_started.clear()
        pending = asyncio.create_task(store.get(cold))
        assert await asyncio.to_thread(fake_registry.pull_started.wait, 10)
        assert (await store.get(hot)).served == hot  # served while the cold pull is stuck
        assert not pending.done()
        fake_registry.gate.set()
        return await asyncio.wait_for(pending, timeout=10)

    assert asyncio.run(go()).served == cold


def test_cancelled_waiter_does_not_cancel_the_shared_load(new_store, published, fake_registry):
    store = new_store()
    fake_registry.gate = threading.Event()
    served = _served(published["a"])

    async def go():
        first = asyncio.create_task(store.get(served))
        second = asyncio.create_task(store.get(served))
        assert await asyncio.to_thread(fake_registry.pull_started.wait, 10)
        first.cancel()
        fake_registry.gate.set()
        return await asyncio.wait_for(second, timeout=10)

    assert asyncio.run(go()).served == served and fake_registry.pulls[served.digest] == 1


def test_host_eviction_falls_back_to_disk_then_disk_eviction_removes_dirs(
    new_store, published, fake_registry, observer
):
    a, b, c = (_served(published[n]) for n in "abc")
    size = published["a"].total_bytes
    store = new_store(host_max_items=1, disk_max_bytes=2 * size + 4096)

    async def go():
        await store.get(a)
        await store.get(b)  # host evicts a; disk keeps a, b
        again = await store.get(a)  # from disk, no second pull
        await store.get(c)  # disk evicts a's LRU dir... a was used last, so b goes
        return again

    asyncio.run(go())
    assert fake_registry.pulls[a.digest] == 1 and [s for s, _, _ in observer.loads] == [
        "registry",
        "registry",
        "disk",
        "registry",
    ]
    assert ("host", "evict", "a") in observer.cache and ("disk", "evict", "b") in observer.cache
    assert _disk_dirs(store) == sorted(d.digest.split(":")[1] for d in (a, c))


def test_restart_reuses_disk_tier_and_repulls_corrupt_copies(new_store, published, fake_registry, observer):
    a = _served(published["a"])
    asyncio.run(new_store().get(a))
    restarted = new_store()
    assert asyncio.run(restarted.get(a)).served == a and fake_registry.pulls[a.digest] == 1
    assert observer.loads[-1][0] == "disk"
    restarted.unload(a)
    weights = restarted.config.cache_dir / a.digest.split(":")[1] / "adapter_model.safetensors"
    weights.write_bytes(b"bit rot")
    assert asyncio.run(restarted.get(a)).served == a
    assert fake_registry.pulls[a.digest] == 2 and observer.loads[-1][0] == "registry"


def test_corrupt_pull_raises_and_leaves_nothing(new_store, published, fake_registry):
    store = new_store()
    a = _served(published["a"])
    fake_registry.corrupt.add(a.digest)
    with pytest.raises(IntegrityError):
        asyncio.run(store.get(a))
    assert _disk_dirs(store) == [] and store.peek(a) is None and store._disk.lru.nbytes == 0
    fake_registry.corrupt.clear()  # not poisoned: the next get pulls again and succeeds
    assert asyncio.run(store.get(a)).served == a and fake_registry.pulls[a.digest] == 2


def test_registry_unreachable_and_unknown(new_store, published, fake_registry, observer, clock):
    store = new_store(alias_refresh=30)
    fake_registry.down = True
    with pytest.raises(Unavailable):
        asyncio.run(store.resolve("a"))
    with pytest.raises(Unavailable):
        asyncio.run(store.get(_served(published["a"])))
    assert _disk_dirs(store) == []
    fake_registry.down = False
    with pytest.raises(NotFound):
        asyncio.run(store.resolve("nope:prod"))
    served = asyncio.run(store.resolve("a"))
    fake_registry.down = True
    clock.now += 60  # alias is due for refresh, registry down: last answer (stale-if-error)
    assert asyncio.run(store.resolve("a")) == served
    assert asyncio.run(store.refresh_aliases()) == []


def test_unknown_and_deleted_versions_are_not_found(new_store, published, fake_registry, observer, monkeypatch):
    store = new_store()
    with pytest.raises(NotFound):
        asyncio.run(store.get(ServedAdapter("a", 9, "sha256:" + "0" * 64)))
    monkeypatch.setattr(fake_registry, "pull", _raise_not_found)  # deleted between resolve and pull
    with pytest.raises(NotFound):
        asyncio.run(store.get(_served(published["a"])))
    assert ("registry", "miss", "a") in observer.cache and _disk_dirs(store) == []


def _raise_not_found(manifest, dest, **_):
    raise NotFound(f"{manifest.name}:{manifest.version} was deleted")


@pytest.mark.parametrize(
    "fingerprint, lora, message",
    [
        ("sha256:" + "1" * 64, {}, "trained on base model"),
        (None, {"use_dora": True}, "DoRA"),
        (None, {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        (None, {"rank": 128}, "rank 128 exceeds"),
    ],
)
def test_incompatible_manifests_are_refused_before_pulling(
    new_store, make_adapter, fake_registry, tiny_base, fingerprint, lora, message
):
    store = new_store()
    manifest = fake_registry.publish("x", make_adapter("a", seed=0), fingerprint or tiny_base.fingerprint, **lora)
    with pytest.raises(FailedPrecondition, match=message):
        asyncio.run(store.get(_served(manifest)))
    assert fake_registry.pulls[manifest.digest] == 0


def test_alias_hot_reload(new_store, make_adapter, fake_registry, tiny_base, clock):
    store = new_store(alias_refresh=30)
    v1 = fake_registry.publish("m", make_adapter("a", seed=0), tiny_base.fingerprint)
    v2 = fake_registry.publish("m", make_adapter("b", seed=1), tiny_base.fingerprint)
    fake_registry.promote("m", 1, "prod")

    async def go():
        running = await store.get(await store.resolve("m:prod"))  # a request in flight on v1
        assert (await store.resolve("m")).version == 2
        fake_registry.promote("m", 2, "prod")
        assert (await store.resolve("m:prod")).version == 1  # cached within the interval
        assert await store.refresh_aliases() == [("m", "prod", 1, 2)]
        assert await store.refresh_aliases() == []
        new = await store.get(await store.resolve("m:prod"))
        return running, new

    running, new = asyncio.run(go())
    assert (running.served.version, new.served.version) == (1, 2)
    assert store.peek(_served(v1)) is running  # old version still usable, unpinned -> evictable
    fake_registry.promote("m", 1, "prod")  # rollback, seen once the interval has passed
    clock.now += 31
    assert asyncio.run(store.resolve("m:prod")) == _served(v1)
    assert asyncio.run(store.resolve("m:2")) == _served(v2)


def test_pin_keeps_an_adapter_resident(new_store, published, observer):
    a, b = _served(published["a"]), _served(published["b"])
    store = new_store(host_max_items=1)
    asyncio.run(store.pin(a))
    assert store.is_pinned(a) and observer.residency["host"][2] == 1
    with pytest.raises(ResourceExhausted):
        asyncio.run(store.get(b))
    store.unpin(a)
    asyncio.run(store.get(b))
    assert store.peek(a) is None and store.peek(b) is not None
    assert store.unload(b) and not store.unload(b)


def test_status_rows(new_store, published, fake_registry):
    a, b = _served(published["a"]), _served(published["b"])
    fake_registry.promote("a", 1, "prod")
    store = new_store(host_max_items=1)

    async def go():
        await store.resolve("a:prod")
        await store.pin(a)
        store.unpin(a)
        await store.get(b)  # a -> disk only
        return (
            await store.status(),
            await store.status("a", include_registry=True),
            await store.status(include_registry=True),
        )

    resident, only_a, everything = asyncio.run(go())
    assert [(r.name, r.version, r.tier) for r in resident] == [("a", 1, "disk"), ("b", 1, "host")]
    assert resident[0].aliases == ("prod",) and resident[1].bytes > 0 and resident[1].rank == 4
    assert [(r.name, r.tier, r.aliases) for r in only_a] == [("a", "disk", ("latest", "prod"))]
    assert [(r.name, r.tier) for r in everything] == [("a", "disk"), ("b", "host"), ("c", "registry")]


def test_config_validation(tmp_path, adapterctl_home):
    from adapterctl.errors import InvalidArgument

    assert AdapterStoreConfig().cache_dir == adapterctl_home / "adapters"
    with pytest.raises(InvalidArgument):
        AdapterStoreConfig(host_max_bytes=-1)
    with pytest.raises(InvalidArgument, match="--alias-refresh"):
        AdapterStoreConfig(alias_refresh=-1)

