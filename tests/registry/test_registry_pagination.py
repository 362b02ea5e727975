"""More than 1,000 versions and names: listings must page through S3's 1,000-key pages."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from adapterctl.registry import layout
from adapterctl.registry.manifest import Manifest

VERSIONS = 1_205


def test_1200_plus_versions_list_in_order(registry, adapter_dir):
    first = registry.publish(adapter_dir, "many")
    fields = {k: v for k, v in first.to_dict().items() if k != "digest"}

    def write(version: int) -> None:  # manifests straight into the store: a publish each would be slow
        _, raw = Manifest.build({**fields, "version": version})
        registry.store.put_if_absent(layout.version_key("many", version), raw)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, range(2, VERSIONS + 1)))
    assert len(list(registry.store.list(layout.versions_prefix("many")))) == VERSIONS
    manifests = registry.list_versions("many")
    assert [m.version for m in manifests] == list(range(1, VERSIONS + 1))
    assert registry.resolve("many").version == VERSIONS
    assert registry.latest_version("many") == VERSIONS
    assert registry.publish(adapter_dir, "many").version == VERSIONS + 1


def test_more_than_1000_names_are_listed(registry):
    names = [f"n{i:04d}" for i in range(1_010)]

    def write(name: str) -> None:  # list_names only needs a key below adapters/<name>/
        registry.store.put(f"{layout.aliases_prefix(name)}x.json", b"{}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, names))
    assert registry.list_names() == names
