"""Admin RPCs (list, load, unload, pin, unpin) and hot reload of aliases after promote."""
from __future__ import annotations

import threading

import pytest

from adapterctl.errors import FailedPrecondition, InvalidArgument, NotFound


def _row(client, name: str, version: int):
    rows = {(r.name, r.version): r for r in client.list_adapters(name)}
    return rows[(name, version)]


def test_list_shows_registry_versions_aliases_and_tiers(client, published):
    _, reg = published
    client.generate("hi", adapter="alpha:prod", max_new_tokens=1)
    rows = client.list_adapters()
    names = {r.name for r in rows}
    assert {"alpha", "beta", "gamma", "delta"} <= names
    v1 = _row(client, "alpha", 1)
    assert v1.tier == "device" and "prod" in v1.aliases and v1.digest == reg.resolve("alpha:1").digest
    assert v1.rank == 4 and v1.bytes > 0 and v1.active_requests == 0
    assert _row(client, "delta", 1).tier == "registry"  # never used on this server
    with pytest.raises(NotFound):
        client.list_adapters("nosuch")


def test_load_pin_unload_cycle(client):
    assert client.load_adapter("beta").tier == "device"
    assert client.pin_adapter("beta").pinned
    with pytest.raises(FailedPrecondition):
        client.unload_adapter("beta")
    assert not client.unpin_adapter("beta").pinned
    returned = client.unload_adapter("beta")
    after = _row(client, "beta", 1)
    assert after.tier in ("host", "disk") and not after.pinned  # off the device, still cached below
    assert returned.tier == after.tier  # the reply says where it lives now, not where it was
    assert client.generate("hi", adapter="beta", max_new_tokens=1).adapter.name == "beta"


@pytest.mark.parametrize("ref, error", [("", InvalidArgument), ("bad/ref", InvalidArgument), ("nosuch", NotFound)])
def test_admin_errors(client, ref, error):
    with pytest.raises(error):
        client.load_adapter(ref)


def test_hot_reload_after_promote(server, client, published, make_adapter):
    """A request running on gamma:prod v1 finishes on v1 while prod moves to v2; new
    requests get v2 without a restart; v1 leaves the device once unused."""
    _, reg = published
    reg.publish(make_adapter("gamma2", seed=22), "gamma")
    reg.promote("gamma", 1, "prod")
    assert client.generate("hi", adapter="gamma:prod", max_new_tokens=1).adapter.version == 1

    stream = client.generate_stream("Once upon a time", adapter="gamma:prod", max_new_tokens=300)
    chunks = iter(stream)
    next(chunks)  # running on v1 now
    reg.promote("gamma", 2, "prod")
    changes: list = []
    refresher = threading.Thread(target=lambda: changes.extend(client.refresh_aliases()))
    refresher.start()
    list(chunks)
    assert stream.result.adapter.version == 1 and stream.result.finish_reason in ("length", "eos")
    refresher.join(60)
    assert [(c.name, c.alias, c.old_version, c.new_version) for c in changes] == [("gamma", "prod", 1, 2)]
    assert client.generate("hi", adapter="gamma:prod", max_new_tokens=1).adapter.version == 2
    assert client.refresh_aliases() == []
    assert _row(client, "gamma", 1).tier != "device"
