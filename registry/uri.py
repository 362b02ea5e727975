"""Opening a registry from a URI: ``file://PATH`` or a plain path, ``s3://BUCKET/PREFIX``.

The backend comes from a scheme -> factory table (:data:`BACKENDS`); backends
import their client libraries only when used.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from urllib.parse import SplitResult, urlsplit

from adapterctl.errors import InvalidArgument
from adapterctl.home import default_registry_uri
from adapterctl.options import option
from adapterctl.registry.registry import Registry
from adapterctl.registry.store import ObjectStore


@dataclass(frozen=True)
class RegistryConfig:
    """How to reach a registry. The fields (:func:`adapterctl.options.option`) are what
    the CLI turns into its common registry options."""

    uri: str | None = option(
        None,
        "Registry URI: a path, file://PATH or s3://BUCKET/PREFIX [default: $ADAPTERCTL_HOME/registry].",
        cli_name="--registry",
        envvar="ADAPTERCTL_REGISTRY",
    )
    s3_endpoint_url: str | None = option(
        None, "S3-compatible endpoint (MinIO, Ceph, moto ...).", envvar="AWS_ENDPOINT_URL"
    )
    # None: path-style exactly when an endpoint URL is set (so the CLI gives --s3-path-style/--no-s3-path-style).
    s3_path_style: bool | None = option(None, "Path-style S3 addressing (the default when an endpoint URL is set).")
    s3_region: str | None = option(None, "S3 region [default: the standard AWS chain].")
    quiet: bool = option(False, "No progress bars.")

    def open(self) -> Registry:
        return open_registry(self.uri, s3_endpoint_url=self.s3_endpoint_url, s3_path_style=self.s3_path_style,
                             s3_region=self.s3_region, quiet=self.quiet)


BackendFactory = Callable[[SplitResult, RegistryConfig], ObjectStore]


def _open_local(parts: SplitResult, config: RegistryConfig) -> ObjectStore:
    from adapterctl.registry.local import LocalStore

    host = parts.netloc if parts.netloc not in ("", "localhost") else ""
    path = host + parts.path
    if not path:
        raise InvalidArgument(f"registry URI {config.uri!r} names no directory")
    return LocalStore(path)


def _open_s3(parts: SplitResult, config: RegistryConfig) -> ObjectStore:
    from adapterctl.registry.s3 import S3Options, S3Store

    options = S3Options(endpoint_url=config.s3_endpoint_url, path_style=config.s3_path_style, region=config.s3_region)
    return S3Store(parts.netloc, parts.path, options)


BACKENDS: dict[str, BackendFactory] = {"file": _open_local, "s3": _open_s3}


def open_store(config: RegistryConfig) -> ObjectStore:
    """The :class:`ObjectStore` for ``config.uri`` (default: the embedded local registry)."""
    uri = config.uri or default_registry_uri()
    parts = urlsplit(uri) if "://" in uri else SplitResult("file", "", uri, "", "")
    factory = BACKENDS.get(parts.scheme)
    if factory is None:
        schemes = ", ".join(f"{s}://" for s in BACKENDS)
        raise InvalidArgument(f"unsupported registry URI {uri!r}: use a path or one of {schemes}")
    return factory(parts, replace(config, uri=uri))


def open_registry(
    uri: str | None = None,
    *,
    s3_endpoint_url: str | None = None,
    s3_path_style: bool | None = None,
    s3_region: str | None = None,
    quiet: bool = True,
) -> Registry:
    """Open the registry at ``uri`` (None: ``$ADAPTERCTL_REGISTRY`` or the local default)."""
    config = RegistryConfig(uri, s3_endpoint_url, s3_path_style, s3_region, quiet)
    return Registry(open_store(config), quiet=quiet)
