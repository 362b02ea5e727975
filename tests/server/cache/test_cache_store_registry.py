"""AdapterStore over the real registry: a local directory and S3 (moto over HTTP)."""
from __future__ import annotations

import asyncio
import threading

import pytest

from adapterctl.errors import IntegrityError, NotFound
from adapterctl.server.cache.config import AdapterStoreConfig
from adapterctl.server.cache.store import AdapterStore

registry = pytest.importorskip("adapterctl.registry")
if not hasattr(registry, "open_registry"):
    pytest.skip("adapterctl.registry.open_registry has not landed yet", allow_module_level=True)


@pytest.fixture(params=["local", "s3"])
def registry_uri(request, tmp_path):
    if request.param == "local":
        return f"file://{tmp_path / 'registry'}"
    return request.getfixturevalue("s3_registry_uri")


@pytest.fixture
def reg(registry_uri):
    return registry.open_registry(registry_uri)


class CountingReader:
    """Wraps a RegistryReader and counts pulls per digest (thread-safe)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.pulls: dict[str, int] = {}
        self._lock = threading.Lock()

    def pull(self, manifest, dest, **kwargs):
        with self._lock:
            self.pulls[manifest.digest] = self.pulls.get(manifest.digest, 0) + 1
        return self.inner.pull(manifest, dest, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture
def store_over(tiny_base, observer, tmp_path):
    stores: list[AdapterStore] = []

    def make(reader, **overrides) -> AdapterStore:
        overrides.setdefault("cache_dir", tmp_path / "disk")
        rank = overrides.pop("max_lora_rank", 64)
        store = AdapterStore(AdapterStoreConfig(**overrides), reader, tiny_base, observer, max_lora_rank=rank)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def _publish(reg, make_adapter, tiny_base, name, seed=0):
    return reg.publish(make_adapter(f"reg-{name}-{seed}", meta=False, seed=seed), name, base_model=str(tiny_base.path))


def test_cold_load_from_registry_single_flight(reg, make_adapter, tiny_base, store_over, observer):
    manifest = _publish(reg, make_adapter, tiny_base, "sentiment")
    reader = CountingReader(reg)
    store = store_over(reader)

    async def go():
        served = await store.resolve("sentiment")
        results = await asyncio.wait_for(asyncio.gather(*(store.get(served) for _ in range(6))), timeout=30)
        return served, results

    served, results = asyncio.run(go())
    assert (served.name, served.version, served.digest) == ("sentiment", 1, manifest.digest)
    assert reader.pulls == {manifest.digest: 1} and all(r is results[0] for r in results)
    assert results[0].rank == 4 and results[0].target_modules == ("q_proj", "v_proj")
    assert [s for s, _, _ in observer.loads] == ["registry"]


def test_promote_hot_reload(reg, make_adapter, tiny_base, store_over):
    _publish(reg, make_adapter, tiny_base, "chat", seed=0)
    _publish(reg, make_adapter, tiny_base, "chat", seed=1)
    reg.promote("chat", 1, "prod")
    store = store_over(reg)

    async def go():
        old = await store.get(await store.resolve("chat:prod"))
        reg.promote("chat", 2, "prod")
        changes = await store.refresh_aliases()
        new = await store.get(await store.resolve("chat:prod"))
        rows = await store.status("chat", include_registry=True)
        return old, changes, new, rows

    old, changes, new, rows = asyncio.run(go())
    assert changes == [("chat", "prod", 1, 2)]
    assert (old.served.version, new.served.version) == (1, 2)
    assert [(r.version, r.tier, r.aliases) for r in rows] == [(1, "host", ()), (2, "host", ("latest", "prod"))]


def test_corrupt_blob_is_refused_and_not_cached(reg, make_adapter, tiny_base, store_over, registry_uri):
    manifest = _publish(reg, make_adapter, tiny_base, "broken")
    weights = manifest.file("adapter_model.safetensors")
    hexdigest = weights.digest.split(":", 1)[1]
    keys = [info.key for info in reg.store.list("") if hexdigest in info.key]
    assert len(keys) == 1
    good = reg.store.get(keys[0])[0]
    reg.store.put(keys[0], b"\0" * len(good))
    store = store_over(reg)
    served = asyncio.run(store.resolve("broken:1"))
    with pytest.raises(IntegrityError):
        asyncio.run(store.get(served))
    assert list(store.config.cache_dir.iterdir()) == [] and store.peek(served) is None
    reg.store.put(keys[0], good)  # repaired: the next get succeeds
    assert asyncio.run(store.get(served)).served == served


def test_unknown_names_and_versions(reg, make_adapter, tiny_base, store_over):
    _publish(reg, make_adapter, tiny_base, "known")
    store = store_over(reg)
    for ref in ("unknown", "known:7", "known:prod"):
        with pytest.raises(NotFound):
            asyncio.run(store.resolve(ref))


def test_unreachable_registry_is_unavailable(store_over, tmp_path, monkeypatch):
    import socket

    from adapterctl.errors import Unavailable

    with socket.socket() as sock:  # a loopback port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    down = registry.open_registry("s3://nowhere/adapters", s3_endpoint_url=f"http://127.0.0.1:{port}")
    store = store_over(down)
    with pytest.raises(Unavailable):
        asyncio.run(store.resolve("anything"))
    assert list(store.config.cache_dir.iterdir()) == []


class GatedReader(CountingReader):
    """Holds ``list_names`` until ``gate`` is set, so a listing is in flight on demand."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.entered = threading.Event()

    def list_names(self):
        self.entered.set()
        assert self.gate.wait(30)
        return self.inner.list_names()


def test_concurrent_listings_share_one_and_never_see_an_older_registry(reg, make_adapter, tiny_base, store_over):
    _publish(reg, make_adapter, tiny_base, "chat", seed=0)
    reader = GatedReader(reg)
    store = store_over(reader)

    async def go():
        first = asyncio.ensure_future(store.status(include_registry=True))
        await asyncio.to_thread(reader.entered.wait, 30)  # listing 1 is in flight, before the publish
        _publish(reg, make_adapter, tiny_base, "chat", seed=1)
        burst = [asyncio.ensure_future(store.status(include_registry=True)) for _ in range(20)]
        # the event loop's default executor is not held by the listing: other work runs meanwhile
        others = asyncio.gather(*(asyncio.to_thread(lambda: 7) for _ in range(12)))
        assert await asyncio.wait_for(others, 10) == [7] * 12
        reader.gate.set()
        return await first, await asyncio.gather(*burst)

    first, burst = asyncio.run(go())
    assert [r.version for r in first][:1] == [1]  # started before the publish (read v2 or not)
    assert all([r.version for r in rows] == [1, 2] for rows in burst)  # asked after it: a later listing
    assert store._listing.listings == 2  # 21 calls, two listings
