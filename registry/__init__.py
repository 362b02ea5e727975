"""Adapter registry: content-addressed blobs, versioned manifests, aliases; local and S3 backends.

Public API (the README's "Registry" section documents the layout and guarantees)::

    from adapterctl.registry import open_registry
    reg = open_registry("s3://bucket/prefix")
    manifest = reg.publish(Path("out/adapter"), "reviews")
    reg.pull("reviews:prod", Path("/tmp/reviews"))
"""
from __future__ import annotations

from adapterctl.registry.aliases import AliasState, Canary
from adapterctl.registry.gc import GcReport
from adapterctl.registry.manifest import FileEntry, Manifest
from adapterctl.registry.registry import Registry, RegistryReader, Route
from adapterctl.registry.store import ObjectInfo, ObjectStore
from adapterctl.registry.uri import BACKENDS, RegistryConfig, open_registry, open_store

__all__ = [
    "AliasState",
    "Canary",
    "Route",
    "BACKENDS",
    "FileEntry",
    "GcReport",
    "Manifest",
    "ObjectInfo",
    "ObjectStore",
    "Registry",
    "RegistryConfig",
    "RegistryReader",
    "open_registry",
    "open_store",
]
