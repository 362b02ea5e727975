"""Aliases (``prod``, ``staging`` ...): a movable pointer to a version, with history.

Each alias is one JSON object holding its target and the stack of earlier
targets. It only moves by compare-and-swap on that object (create-only for a
new alias), so of two concurrent promotions one wins and the other gets
Conflict — no update is lost silently.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

from adapterctl.errors import AlreadyExists, Conflict, FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from adapterctl.refs import LATEST, validate_alias, validate_name
from adapterctl.registry import layout
from adapterctl.registry.manifest import encode
from adapterctl.registry.versions import Versions

ALIAS_FORMAT = "adapterctl.alias/v1"
MAX_HISTORY = 100


@dataclass(frozen=True)
class AliasState:
    """An alias as stored: ``version`` now, ``history`` the earlier targets (oldest first)."""

    version: int
    history: list[int]
    etag: str


class Aliases:
    def __init__(self, versions: Versions) -> None:
        self.versions = versions
        self.store = versions.store

    def read(self, name: str, alias: str) -> AliasState | None:
        try:
            raw, etag = self.store.get(layout.alias_key(name, alias))
        except NotFound:
            return None
        try:
            data = json.loads(raw)
            return AliasState(int(data["version"]), [int(v) for v in data.get("history", [])], etag)
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise IntegrityError(f"alias {name}:{alias} is malformed: {exc}") from None

    def all(self, name: str) -> dict[str, int]:
        """``{alias: version}`` for every alias of ``name``."""
        out = {}
        for info in self.store.list(layout.aliases_prefix(name)):
            alias = layout.alias_of_key(info.key)
            state = self.read(name, alias) if alias else None
            if state is not None:
                out[alias] = state.version
        return out

    def target(self, name: str, alias: str) -> int:
        state = self.read(name, alias)
        if state is None:
            raise NotFound(f"alias {alias!r} of adapter {name!r} not found in registry {self.store.uri}")
        return state.version

    def promote(self, name: str, version: int, alias: str, by: str) -> int | None:
        """Point ``alias`` at ``name:version``; returns the previous target (None if new)."""
        validate_name(name)
        if validate_alias(alias) == LATEST:
            raise InvalidArgument("'latest' is implicit (the newest version) and cannot be promoted")
        self.versions.read(name, version)  # NotFound for unknown or deleted versions
        state = self.read(name, alias)
        if state is not None and state.version == version:
            return version
        history = [*state.history, state.version][-MAX_HISTORY:] if state else []
        self._write(name, alias, version, history, state, by)
        return state.version if state else None

    def rollback(self, name: str, alias: str, by: str) -> int:
        """Move ``alias`` back to its previous live target; returns that version."""
        state = self.read(name, alias)
        if state is None:
            raise NotFound(f"alias {alias!r} of adapter {name!r} not found in registry {self.store.uri}")
        history = list(state.history)
        while history:
            candidate = history.pop()
            try:
                self.versions.read(name, candidate)
            except NotFound:  # deleted with --force since; skip it
                continue
            self._write(name, alias, candidate, history, state, by)
            return candidate
        raise FailedPrecondition(f"alias {name}:{alias} has no earlier target to roll back to")

    def _write(self, name: str, alias: str, version: int, history: list[int], state: AliasState | None, by: str) -> None:
        doc = encode({
            "format": ALIAS_FORMAT, "name": name, "alias": alias, "version": version, "history": history,
            "updated": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "updated_by": by,
        })
        key = layout.alias_key(name, alias)
        try:
            if state is None:
                self.store.put_if_absent(key, doc)
            else:
                self.store.put_if_match(key, doc, state.etag)
        except (AlreadyExists, Conflict):
            was = f"it no longer points to {name}:{state.version}" if state else "it was created meanwhile"
            raise Conflict(
                f"alias {name}:{alias} was moved by someone else ({was}); "
                f"check `adapterctl show {name}:{alias}` and retry"
            ) from None
