"""``AdapterStoreConfig``: the settings of the adapter store (host-RAM and disk tiers,
reference resolution), declared once; ``ServerConfig`` nests it, so each field is also an
``adapterctl serve`` option. A light module: no torch."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapterctl.errors import InvalidArgument
from adapterctl.home import home
from adapterctl.options import option


@dataclass
class AdapterStoreConfig:
    """Budgets and behaviour of the host and disk tiers and of reference resolution."""

    cache_dir: Path | None = option(None, "Disk tier for pulled adapters (default $ADAPTERCTL_HOME/adapters).",
                                    path="dir")
    disk_max_bytes: int | None = option(20 << 30, "Disk-tier budget in bytes.")
    verify_disk: bool = option(True, "Re-check the sha256 of disk-tier files before loading them.")
    host_max_bytes: int | None = option(2 << 30, "Host-RAM budget for adapter weights in bytes.")
    host_max_items: int | None = option(None, "Most adapter versions kept in host RAM (unset: no count limit).")
    alias_refresh: float = option(30.0, "Hot reload: seconds a resolved NAME / NAME:ALIAS is trusted before it is "
                                  "re-resolved, and the period of the background refresh (0 = re-resolve on every "
                                  "request). The RefreshAliases RPC refreshes at once.")
    load_workers: int = option(4, "Threads that pull and load adapters off the event loop.")
    max_cached_refs: int = option(4096, "Most references/manifests remembered by the resolver.")

    def __post_init__(self) -> None:
        for name in ("host_max_bytes", "host_max_items", "disk_max_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgument(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.alias_refresh < 0:
            raise InvalidArgument(f"--alias-refresh must be >= 0, got {self.alias_refresh}")
        if self.load_workers < 1 or self.max_cached_refs < 1:
            raise InvalidArgument("--load-workers and --max-cached-refs must be >= 1")
        self.cache_dir = Path(self.cache_dir).expanduser() if self.cache_dir is not None else home() / "adapters"
