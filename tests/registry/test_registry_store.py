"""The ObjectStore contract both backends implement (create-only, CAS, listing, streaming)."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapterctl.errors import AlreadyExists, Conflict, InvalidArgument, NotFound


@pytest.fixture
def store(registry):
    return registry.store


def test_create_only_and_compare_and_swap(store):
    etag = store.put_if_absent("a/b.json", b"one")
    with pytest.raises(AlreadyExists):
        store.put_if_absent("a/b.json", b"two")
    data, current = store.get("a/b.json")
    assert data == b"one" and current == etag
    new = store.put_if_match("a/b.json", b"three", etag)
    with pytest.raises(Conflict):
        store.put_if_match("a/b.json", b"four", etag)  # stale etag
    assert store.get("a/b.json") == (b"three", new)
    store.delete("a/b.json")
    store.delete("a/b.json")  # idempotent
    with pytest.raises(Conflict):
        store.put_if_match("a/b.json", b"five", new)  # deleted meanwhile
    with pytest.raises(NotFound):
        store.get("a/b.json")
    assert not store.exists("a/b.json")


def test_only_one_of_many_concurrent_creators_wins(store):
    def create(i: int) -> bool:
        try:
            store.put_if_absent("race.json", b"%d" % i)
            return True
        except AlreadyExists:
            return False

    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(create, range(8)))
    assert wins.count(True) == 1
    assert store.get("race.json")[0] == b"%d" % wins.index(True)


def test_listing_is_ordered_and_prefix_based(store):
    for key in ("x/2.json", "x/10.json", "x/1.json", "xy/1.json", "y/z/1.json"):
        store.put(key, key.encode())
    assert [o.key for o in store.list("x/")] == ["x/1.json", "x/10.json", "x/2.json"]
    assert [o.key for o in store.list("x")] == ["x/1.json", "x/10.json", "x/2.json", "xy/1.json"]
    assert [(o.key, o.size) for o in store.list("y/")] == [("y/z/1.json", 10)]
    assert list(store.list_dirs("")) == ["x", "xy", "y"]
    assert list(store.list_dirs("y/")) == ["z"] and list(store.list_dirs("nope/")) == []


def test_streamed_files_and_touch(store):
    payload = bytes(range(256)) * 9000  # several chunks
    moved = []
    store.put_file("blobs/f", io.BytesIO(payload), len(payload), moved.append)
    assert sum(moved) == len(payload)
    assert b"".join(store.read_chunks("blobs/f", chunk_size=65536)) == payload
    before = store.head("blobs/f")
    assert before.size == len(payload)
    store.touch("blobs/f")
    assert store.head("blobs/f").last_modified >= before.last_modified
    with pytest.raises(NotFound):
        list(store.read_chunks("blobs/missing"))
    with pytest.raises(NotFound):
        store.head("blobs/missing")


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/../b", "a/.hidden"])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(InvalidArgument):
        store.put(key, b"x")


def test_local_listing_cannot_leave_the_root(tmp_path):
    from adapterctl.registry.local import LocalStore

    store = LocalStore(tmp_path / "root")
    for prefix in ("../", "a/../../", "/etc/"):
        with pytest.raises(InvalidArgument):
            list(store.list(prefix))
        with pytest.raises(InvalidArgument):
            list(store.list_dirs(prefix))


def test_s3_client_settings_for_compatible_endpoints(moto_server, monkeypatch):
    from adapterctl.registry.s3 import S3Options, S3Store

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    custom = S3Store("b", "p", S3Options(endpoint_url=moto_server))
    config = custom._client.meta.config
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.s3["addressing_style"] == "path" and config.retries["mode"] == "standard"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    assert S3Store("b", "p").endpoint_url == moto_server
    virtual = S3Store("b", "p", S3Options(endpoint_url=moto_server, path_style=False, checksums_when_required=False))
    assert virtual._client.meta.config.s3["addressing_style"] == "auto"
    assert virtual._client.meta.config.request_checksum_calculation != "when_required"


def test_progress_bars_need_a_request_size_and_a_tty(monkeypatch):
    import sys

    from adapterctl.registry.transfer import progress_bar

    assert progress_bar(10 << 20, "x", enabled=True).disable  # pytest's stderr is not a TTY
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with progress_bar(10 << 20, "x", enabled=True) as bar:
        assert not bar.disable
    assert progress_bar(10 << 20, "x", enabled=False).disable
    assert progress_bar(10, "x", enabled=True).disable
