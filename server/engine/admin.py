"""Admin operations of the batching engine (ListAdapters, Load/Unload/Pin, alias refresh)
over its device slots and adapter store. Slot changes run on the decode thread between
steps; :class:`AdminHost` is all it needs from the engine."""
from __future__ import annotations

from typing import Any, Callable, Protocol

from adapterctl.errors import FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from adapterctl.server.engine.slots import DeviceSlots
from adapterctl.server.types import AdapterSource, AdapterStatus, HostAdapter, ServedAdapter


class AdminHost(Protocol):
    """What :class:`AdapterAdmin` uses of the engine (``BatchingEngine`` implements it)."""

    slots: DeviceSlots | None  # None until the engine has started
    store: AdapterSource | None  # None: the engine serves the base model only

    async def fetch(self, ref: str) -> tuple[ServedAdapter, HostAdapter]: ...

    async def on_decode_thread(self, fn: Callable[[], Any]) -> Any: ...

    def wake(self) -> None: ...


class AdapterAdmin:
    """Admin RPCs of one engine. Keeps the versions an alias moved away from (``retired``)
    until the decode thread unloads them from their slots (:meth:`evict_retired`)."""

    def __init__(self, host: AdminHost) -> None:
        self.host = host
        self.retired: set[tuple[str, int]] = set()  # (name, version)

    @property
    def slots(self) -> DeviceSlots:
        if self.host.slots is None:
            raise Unavailable("the engine is not running")
        return self.host.slots

    def _device_status(self, served: ServedAdapter) -> AdapterStatus | None:
        entry = self.slots.lru.peek(served)
        if entry is None:
            return None
        return AdapterStatus(served.name, served.version, served.digest, "device", self.slots.lru.is_pinned(served),
                             entry.nbytes, entry.rank, self.slots.lru.refcount(served))

    async def list_adapters(self, name: str | None = None) -> list[AdapterStatus]:
        """Store rows (host/disk/registry) with device-resident versions overlaid."""
        rows: dict[str, AdapterStatus] = {}
        store = self.host.store
        if store is not None:
            for row in await store.status(name, include_registry=True):
                rows[row.digest] = row
        for served in self.slots.lru.keys():
            dev = self._device_status(served)
            if dev is None or name not in (None, served.name):
                continue
            if served.digest in rows:
                dev.aliases = rows[served.digest].aliases
            rows[served.digest] = dev
        return sorted(rows.values(), key=lambda r: (r.name, r.version))

    async def load_adapter(self, ref: str) -> AdapterStatus:
        """Fetch into host RAM and a device slot ahead of traffic."""
        served, adapter = await self.host.fetch(ref)

        def load() -> AdapterStatus:
            if self.slots.ensure(adapter) is None:
                raise ResourceExhausted("the device pages an adapter of this rank needs are pinned or in use; "
                                        "retry when requests finish")
            status = self._device_status(served)
            assert status is not None  # just ensured, on the decode thread
            return status

        return await self.host.on_decode_thread(load)

    async def unload_adapter(self, ref: str) -> AdapterStatus:
        """Drop from the device and host tiers; FailedPrecondition while pinned or in use."""
        served = await self._resolve(ref)

        def unload() -> AdapterStatus | None:
            status = self._device_status(served)
            if status is not None:
                if status.active_requests:
                    raise FailedPrecondition(f"adapter {served.name}:{served.version} is serving "
                                             f"{status.active_requests} requests")
                self.slots.unload(served)
            return status

        await self.host.on_decode_thread(unload)
        if self.host.store is not None:
            self.host.store.unload(served)
        # Report where the adapter lives now (disk or registry), not where it was.
        now = [r for r in await self.list_adapters(served.name) if r.digest == served.digest]
        return now[0] if now else AdapterStatus(served.name, served.version, served.digest, "registry")

    async def pin_adapter(self, ref: str, pinned: bool) -> AdapterStatus:
        """Pin keeps the adapter in a device slot (and host RAM) until unpinned."""
        if pinned:
            await self.load_adapter(ref)
        served = await self._resolve(ref)
        store = self.host.store
        if store is not None:
            await store.pin(served) if pinned else store.unpin(served)

        def pin() -> AdapterStatus:
            if served in self.slots.lru:
                self.slots.pin(served, pinned)
            return self._device_status(served) or AdapterStatus(served.name, served.version, served.digest, "host")

        return await self.host.on_decode_thread(pin)

    async def _resolve(self, ref: str) -> ServedAdapter:
        if self.host.store is None:
            raise NotFound(f"adapter {ref!r}: no adapter store")
        return await self.host.store.resolve(ref)

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]:
        """Re-resolve aliases; a version an alias moved away from leaves its device slot as
        soon as no running request uses it (requests already on it finish on it)."""
        if self.host.store is None:
            return []
        changes = await self.host.store.refresh_aliases()
        if changes:
            self.retired.update((name, old) for name, _, old, _ in changes)
            self.host.wake()
        return changes

    def evict_retired(self) -> None:
        """Decode thread: unload retired versions that are idle (pinned ones stay)."""
        if not self.retired:
            return
        lru = self.slots.lru
        for served in lru.keys():
            key = (served.name, served.version)
            if key in self.retired and lru.refcount(served) == 0:
                self.retired.discard(key)
                if not lru.is_pinned(served):
                    self.slots.unload(served)
        self.retired &= {(s.name, s.version) for s in lru.keys()}

