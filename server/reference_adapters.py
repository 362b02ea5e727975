"""Adapter residency for the reference engine: reference resolution (cached, aliases
refreshed on demand), registry -> disk pulls, and an LRU of PEFT adapters on one model.

Threading: :meth:`PeftAdapters.resolve` and :meth:`refresh` may run on any thread
(registry I/O); everything that touches the model (``use``, ``load``, ``unload``,
``pin``) runs on the engine's single worker thread.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from adapterctl.basemodel import BaseModel
from adapterctl.errors import FailedPrecondition
from adapterctl.refs import LATEST, parse_ref
from adapterctl.server.cache.loaded import check_base_fingerprint, check_lora_config
from adapterctl.server.cache.lru import LRUCache
from adapterctl.server.engine.api import EngineObserver, ServedAdapter

if TYPE_CHECKING:
    from adapterctl.registry import Manifest, RegistryReader

log = logging.getLogger(__name__)


@dataclass
class _Resident:
    """One adapter loaded into the PEFT model under ``key``."""

    served: ServedAdapter
    key: str
    nbytes: int
    rank: int


def served_of(manifest: "Manifest") -> ServedAdapter:
    return ServedAdapter(manifest.name, int(manifest.version), manifest.digest)


class PeftAdapters:
    """Up to ``max_adapters`` adapters loaded into one PEFT model, LRU-evicted."""

    def __init__(self, model: Any, base: BaseModel, reader: "RegistryReader", cache_dir: Path,
                 max_adapters: int, max_lora_rank: int, observer: EngineObserver,
                 alias_ttl: float = 30.0) -> None:
        self._base_model = model  # the plain HF model; wrapped by PEFT on first load
        self.peft: Any = None
        self._base = base
        self._reader = reader
        self._cache_dir = cache_dir
        self._max_lora_rank = max_lora_rank
        self._observer = observer
        self._refs: dict[str, "Manifest"] = {}  # reference text -> manifest it resolved to
        self._resolved_at: dict[str, float] = {}  # mutable refs: when they were last resolved
        self._alias_ttl = alias_ttl
        self._refs_lock = threading.Lock()
        self._active: Counter[str] = Counter()  # digest -> queued or running requests
        self._active_lock = threading.Lock()
        self.device = LRUCache[str, _Resident](max_items=max_adapters, sizeof=lambda r: r.nbytes,
                                               on_evict=self._on_evict)

    # ---- resolution (any thread) ---------------------------------------------
    def resolve(self, ref: str) -> "Manifest":
        """Manifest for ``ref``; mutable refs (latest, aliases) are trusted for ``alias_ttl``
        seconds (or until :meth:`refresh`), exact versions and digests forever."""
        parsed = parse_ref(ref)
        key = str(parsed)
        with self._refs_lock:
            cached = self._refs.get(key)
            fresh = not _is_mutable(key) or time.monotonic() - self._resolved_at.get(key, 0.0) < self._alias_ttl
        if cached is not None and fresh:
            return cached
        manifest = self._reader.resolve(parsed)
        check_base_fingerprint((manifest.base_model or {}).get("fingerprint"), self._base, f"adapter {key}")
        check_lora_config(manifest.lora or {}, self._max_lora_rank, f"adapter {key}")
        with self._refs_lock:
            self._refs[key] = manifest
            self._resolved_at[key] = time.monotonic()
        if cached is not None and cached.digest != manifest.digest:
            log.info("alias %s moved %s -> %s", key, cached.version, manifest.version)
        return manifest

    def refresh(self) -> list[tuple[str, str, int, int]]:
        """Re-resolve every cached ``NAME`` / ``NAME:ALIAS``; return (name, alias, old, new) changes."""
        with self._refs_lock:
            mutable = {k: m for k, m in self._refs.items() if _is_mutable(k)}
        changes = []
        for key, old in mutable.items():
            new = self._reader.resolve(parse_ref(key))
            with self._refs_lock:
                self._refs[key] = new
                self._resolved_at[key] = time.monotonic()
            if new.digest == old.digest:
                continue
            parsed = parse_ref(key)
            changes.append((parsed.name, parsed.alias or LATEST, int(old.version), int(new.version)))
            log.info("alias %s moved %s -> %s", key, old.version, new.version)
        return changes

    def unreferenced(self) -> list[str]:
        """Resident digests no cached reference points at any more (candidates to drop)."""
        with self._refs_lock:
            live = {m.digest for k, m in self._refs.items() if _is_mutable(k)}
            immutable = {m.digest for k, m in self._refs.items() if not _is_mutable(k)}
        return [d for d in self.device.keys() if d not in live and d not in immutable]

    def aliases_of(self, digest: str) -> list[str]:
        with self._refs_lock:
            return sorted(parse_ref(k).alias or LATEST for k, m in self._refs.items()
                          if m.digest == digest and _is_mutable(k))

    # ---- in-use accounting (any thread) ----------------------------------------
    def acquire(self, digest: str) -> None:
        with self._active_lock:
            self._active[digest] += 1

    def release(self, digest: str) -> None:
        with self._active_lock:
            self._active[digest] -= 1
            if self._active[digest] <= 0:
                del self._active[digest]

    def active(self, digest: str) -> int:
        with self._active_lock:
            return self._active.get(digest, 0)

    # ---- model mutation (worker thread) ------------------------------------------
    @contextlib.contextmanager
    def use(self, manifest: "Manifest | None") -> Iterator[Any]:
        """Yield the model to call ``generate`` on, with ``manifest``'s adapter (None = base) active."""
        if manifest is None:
            if self.peft is None:
                yield self._base_model
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        resident = self.load(manifest)
        self.device.acquire(resident.served.digest)
        try:
            self.peft.set_adapter(resident.key)
            yield self.peft
        finally:
            self.device.release(resident.served.digest)

    def load(self, manifest: "Manifest") -> _Resident:
        """Make ``manifest``'s adapter resident (pulling it if needed); marks it most recently used."""
        resident = self.device.get(manifest.digest)
        if resident is not None:
            self._observer.on_cache("device", "hit", manifest.name)
            return resident
        self._observer.on_cache("device", "miss", manifest.name)
        path = self._pull(manifest)
        config = json.loads((path / "adapter_config.json").read_text())
        check_lora_config(config, self._max_lora_rank, f"adapter {manifest.name}:{manifest.version}")
        key = "ad_" + manifest.digest.split(":", 1)[-1][:16]
        rank = int(config.get("r", 0) or 0)
        resident = _Resident(served_of(manifest), key, int(manifest.total_bytes or 0), rank)
        started = time.monotonic()
        if self.peft is None:
            from peft import PeftModel

            self.peft = PeftModel.from_pretrained(self._base_model, str(path), adapter_name=key)
            self.peft.eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=key)
        try:
            self.device.put(manifest.digest, resident)
        except Exception:
            self.peft.delete_adapter(key)
            raise
        self._observer.on_load("host", time.monotonic() - started, manifest.name)
        self._report()
        return resident

    def unload(self, digest: str) -> None:
        if self.device.is_pinned(digest):
            raise FailedPrecondition("adapter is pinned; unpin it first")
        if self.active(digest):
            raise FailedPrecondition(f"adapter is in use by {self.active(digest)} request(s)")
        self.device.pop(digest)
        self._report()

    def pin(self, manifest: "Manifest", pinned: bool) -> None:
        if pinned:
            self.load(manifest)
            self.device.pin(manifest.digest)
        elif manifest.digest in self.device:
            self.device.unpin(manifest.digest)
        self._report()

    def tier(self, manifest: "Manifest") -> str:
        if manifest.digest in self.device:
            return "device"
        return "disk" if (self._disk_path(manifest) / "adapter_config.json").is_file() else "registry"

    def _on_evict(self, digest: str, resident: _Resident) -> None:
        # Runs in the worker thread (the only thread that puts/pops).
        self.peft.delete_adapter(resident.key)
        self._observer.on_cache("device", "evict", resident.served.name)
        log.info("evicted adapter %s:%s from the device", resident.served.name, resident.served.version)

    def _report(self) -> None:
        self._observer.on_residency("device", len(self.device), self.device.nbytes, self.device.pinned_count)

    def _disk_path(self, manifest: "Manifest") -> Path:
        return self._cache_dir / manifest.name / f"{manifest.version}-{manifest.digest.split(':', 1)[-1][:16]}"

    def _pull(self, manifest: "Manifest") -> Path:
        dest = self._disk_path(manifest)
        if (dest / "adapter_config.json").is_file():
            self._observer.on_cache("disk", "hit", manifest.name)
            return dest
        self._observer.on_cache("disk", "miss", manifest.name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self._reader.pull(manifest, dest)
        self._observer.on_load("registry", time.monotonic() - started, manifest.name)
        return dest


def _is_mutable(key: str) -> bool:
    parsed = parse_ref(key)
    return parsed.version is None and parsed.digest is None
