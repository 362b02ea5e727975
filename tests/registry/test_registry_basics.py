"""Publish, list, resolve, pull and blob sharing; every body runs on both backends."""
from __future__ import annotations

import hashlib
import json

import pytest
from registry_testkit import FINGERPRINT, make_adapter

from adapterctl.errors import AlreadyExists, InvalidArgument, NotFound
from adapterctl.registry import Manifest, Registry, RegistryReader, open_registry
from adapterctl.registry.layout import BLOBS


def test_publish_twice_gives_versions_1_and_2_and_lists(registry, adapter_dir):
    first = registry.publish(adapter_dir, "reviews", labels={"team": "nlp"})
    second = registry.publish(adapter_dir, "reviews")
    assert (first.version, second.version) == (1, 2)
    assert first.ref == "reviews:1" and first.digest != second.digest
    assert registry.list_names() == ["reviews"]
    assert [m.version for m in registry.list_versions("reviews")] == [1, 2]
    assert registry.resolve("reviews").version == 2
    assert registry.resolve("reviews:1") == first
    assert registry.resolve(f"reviews@{first.digest}") == first
    assert isinstance(registry, RegistryReader)


def test_manifest_records_adapter_metadata(registry, adapter_dir):
    m = registry.publish(adapter_dir, "reviews", labels={"team": "nlp", "ticket": "ML-7"})
    assert m.base_model == {"id": "fake-base", "fingerprint": FINGERPRINT}
    assert m.lora == {"rank": 4, "alpha": 8, "use_rslora": False, "target_modules": ["q_proj", "v_proj"],
                      "dtype": "float32", "use_dora": False, "modules_to_save": []}
    assert [f.path for f in m.files] == ["adapter_config.json", "adapter_model.safetensors", "adapterctl.json"]
    for entry in m.files:
        data = (adapter_dir / entry.path).read_bytes()
        assert entry.size == len(data) and entry.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert m.total_bytes == sum(f.size for f in m.files)
    assert m.training["metrics"]["train_loss"] == 1.5 and m.training["dataset"]["train_sha256"] == "cd" * 32
    assert m.labels == {"team": "nlp", "ticket": "ML-7"}
    assert set(m.publisher) == {"user", "host", "tool"} and m.publisher["tool"].startswith("adapterctl/")
    assert m.created.endswith("+00:00")
    assert Manifest.from_json(m.to_json()) == m


def test_manifest_digest_is_sha256_of_stored_bytes(registry, adapter_dir):
    m = registry.publish(adapter_dir, "reviews")
    raw, _ = registry.store.get("adapters/reviews/versions/000000001.json")
    assert m.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert "digest" not in json.loads(raw)


def test_digest_reference_works_without_the_digest_index(registry, adapter_dir):
    from adapterctl.registry.layout import digest_key

    first = registry.publish(adapter_dir, "reviews")
    registry.publish(adapter_dir, "reviews")
    registry.store.delete(digest_key("reviews", first.digest))  # e.g. a publisher died right after its manifest
    assert registry.resolve(f"reviews@{first.digest}") == first


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", "x" * 129, ".hidden", "a..b", "-dash", "sp ace", "x\n"])
def test_invalid_names_are_refused_and_nothing_written(registry, adapter_dir, bad):
    with pytest.raises(InvalidArgument, match="name"):
        registry.publish(adapter_dir, bad)
    assert list(registry.store.list("")) == []


@pytest.mark.parametrize("ref", ["nope", "nope:1", "nope:prod", "nope@sha256:" + "0" * 64])
def test_unknown_references_are_not_found(registry, adapter_dir, ref):
    registry.publish(adapter_dir, "reviews")
    with pytest.raises(NotFound, match="nope"):
        registry.resolve(ref)


def test_unknown_version_and_alias_of_a_known_name(registry, adapter_dir):
    registry.publish(adapter_dir, "reviews")
    with pytest.raises(NotFound, match="reviews:7"):
        registry.resolve("reviews:7")
    with pytest.raises(NotFound, match="alias 'prod'"):
        registry.resolve("reviews:prod")


def test_same_content_twice_shares_blobs_without_second_upload(registry, adapter_dir, monkeypatch):
    uploads: list[str] = []
    real_put_file = registry.store.put_file
    monkeypatch.setattr(
        registry.store, "put_file", lambda key, *a, **kw: (uploads.append(key), real_put_file(key, *a, **kw))[1]
    )
    first = registry.publish(adapter_dir, "reviews")
    assert len(uploads) == 3
    second = registry.publish(adapter_dir, "reviews")
    third = registry.publish(adapter_dir, "other-name")
    assert len(uploads) == 3, "unchanged files must not be uploaded again"
    assert first.files == second.files == third.files
    assert len(list(registry.store.list(BLOBS))) == 3


def test_pull_writes_a_plain_peft_directory(registry, adapter_dir, tmp_path):
    m = registry.publish(adapter_dir, "reviews")
    dest = registry.pull("reviews:1", tmp_path / "out" / "reviews")
    assert sorted(p.name for p in dest.iterdir()) == [f.path for f in m.files]
    for entry in m.files:
        assert (dest / entry.path).read_bytes() == (adapter_dir / entry.path).read_bytes()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["reviews"]  # no temp dir left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert registry.pull(m, empty) == empty and (empty / "adapter_config.json").is_file()
    with pytest.raises(AlreadyExists):
        registry.pull(m, dest)


def test_bf16_adapter_is_accepted(registry, tmp_path):
    from registry_testkit import lora_tensors, write_bf16_safetensors

    path = make_adapter(tmp_path / "bf16")
    write_bf16_safetensors(path / "adapter_model.safetensors", lora_tensors())
    assert registry.publish(path, "bf16").lora["dtype"] == "bfloat16"


def test_open_registry_picks_backend_by_scheme(tmp_path, monkeypatch):
    from adapterctl.registry.local import LocalStore

    for uri in (str(tmp_path / "a"), f"file://{tmp_path / 'b'}"):
        reg = open_registry(uri)
        assert isinstance(reg, Registry) and isinstance(reg.store, LocalStore)
    monkeypatch.setenv("ADAPTERCTL_REGISTRY", f"file://{tmp_path / 'env'}")
    assert open_registry().uri == f"file://{tmp_path / 'env'}"
    with pytest.raises(InvalidArgument, match="unsupported registry URI 'gs://b/p'"):
        open_registry("gs://b/p")
    with pytest.raises(InvalidArgument, match="bucket"):
        open_registry("s3:///prefix")


def test_s3_missing_bucket_and_unreachable_endpoint_are_clear(moto_server, monkeypatch):
    from adapterctl.errors import Unavailable

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    with pytest.raises(NotFound, match="bucket 'no-such-bucket' does not exist"):
        open_registry("s3://no-such-bucket/x").list_names()
    from adapterctl.registry.s3 import S3Options, S3Store

    reg = Registry(S3Store("b", "x", S3Options(endpoint_url="http://127.0.0.1:9", max_attempts=1)))
    with pytest.raises(Unavailable, match="unreachable"):
        reg.list_names()
