"""Aliases (``prod``, ``staging`` ...): a movable pointer to a version, with history,
optionally splitting traffic with one weighted canary version.

Each alias is one JSON object. It only moves by compare-and-swap on that object
(create-only for a new alias), so of two concurrent changes (promote, canary,
rollback) one wins and the other gets Conflict — no update is lost silently.

Document (format ``adapterctl.alias/v2``)::

    {"format": "adapterctl.alias/v2", "name": "reviews", "alias": "prod",
     "version": 3,                          # the primary: the only field v1 readers use
     "history": [1, 2],                     # earlier primaries, oldest first (as in v1)
     "canary": {"version": 4, "weight": 10.0} | null,   # percent of traffic, 0 < weight < 100
     "changes": [{"at", "by", "action", "version", "canary"}, ...],  # audit log, newest last
     "updated": ISO 8601, "updated_by": "user@host"}

``version`` and ``history`` keep their v1 meaning, so a reader that knows only
v1 still reads the primary version of a v2 alias (it ignores the canary).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from adapterctl.errors import AlreadyExists, Conflict, FailedPrecondition, IntegrityError, InvalidArgument, NotFound
from adapterctl.refs import LATEST, validate_alias, validate_name
from adapterctl.registry import layout
from adapterctl.registry.manifest import encode
from adapterctl.registry.versions import Versions

ALIAS_FORMAT = "adapterctl.alias/v2"
MAX_HISTORY = 100


@dataclass(frozen=True)
class Canary:
    """The second version of a weighted alias: ``weight`` percent of traffic (0 < weight < 100)."""

    version: int
    weight: float

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "weight": self.weight}


@dataclass(frozen=True)
class AliasState:
    """An alias as stored: ``version`` (the primary) now, ``history`` the earlier
    primaries (oldest first), ``canary`` the weighted second version or None."""

    version: int
    history: list[int]
    etag: str
    canary: Canary | None = None
    changes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def primary_weight(self) -> float:
        return 100.0 - (self.canary.weight if self.canary else 0.0)

    def versions(self) -> dict[int, float]:
        """``{version: percent of traffic}`` (one or two entries)."""
        out = {self.version: self.primary_weight}
        if self.canary:
            out[self.canary.version] = self.canary.weight
        return out


def check_weight(weight: float) -> float:
    """A canary weight is a percentage strictly between 0 and 100."""
    try:
        value = float(weight)
    except (TypeError, ValueError):
        raise InvalidArgument(f"canary weight must be a number, got {weight!r}") from None
    if math.isnan(value) or not 0 < value < 100:
        raise InvalidArgument(f"canary weight must be a percentage in (0, 100), got {weight!r}")
    return value


def parse_alias(raw: bytes, etag: str) -> AliasState:
    """An :class:`AliasState` from stored bytes (v1 or v2). ValueError/KeyError/TypeError if malformed."""
    data = json.loads(raw)
    canary = data.get("canary")
    return AliasState(
        int(data["version"]), [int(v) for v in data.get("history", [])], etag,
        Canary(int(canary["version"]), check_weight(canary["weight"])) if canary else None,
        list(data.get("changes", [])),
    )


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
            return parse_alias(raw, etag)
        except (ValueError, KeyError, TypeError, RecursionError, InvalidArgument) as exc:
            raise IntegrityError(f"alias {name}:{alias} is malformed: {exc}") from None

    def states(self, name: str) -> dict[str, AliasState]:
        """``{alias: state}`` for every alias of ``name``."""
        out: dict[str, AliasState] = {}
        for info in self.store.list(layout.aliases_prefix(name)):
            alias = layout.alias_of_key(info.key)
            state = self.read(name, alias) if alias else None
            if alias and state is not None:
                out[alias] = state
        return out

    def all(self, name: str) -> dict[str, int]:
        """``{alias: primary version}`` for every alias of ``name``."""
        return {alias: state.version for alias, state in self.states(name).items()}

    def state(self, name: str, alias: str) -> AliasState:
        state = self.read(name, alias)
        if state is None:
            raise NotFound(f"alias {alias!r} of adapter {name!r} not found in registry {self.store.uri}")
        return state

    def target(self, name: str, alias: str) -> int:
        return self.state(name, alias).version

    def promote(self, name: str, version: int, alias: str, by: str) -> int | None:
        """Point ``alias`` at ``name:version`` for all traffic (a canary is dropped;
        promoting the canary makes it the primary). Returns the previous primary (None if new)."""
        self._check(name, version, alias)
        state = self.read(name, alias)
        if state is not None and state.version == version and state.canary is None:
            return version
        history = state.history if state else []
        if state is not None and state.version != version:
            history = [*history, state.version][-MAX_HISTORY:]
        self._write(name, alias, version, history, None, state, by, "promote")
        return state.version if state else None

    def set_canary(self, name: str, version: int, alias: str, weight: float, by: str) -> AliasState:
        """Send ``weight`` percent of ``alias``'s traffic to ``name:version``; the primary
        stays. Replaces an existing canary. FailedPrecondition for an alias that does not exist."""
        weight = check_weight(weight)
        self._check(name, version, alias)
        state = self.read(name, alias)
        if state is None:
            raise FailedPrecondition(
                f"alias {name}:{alias} does not exist: promote a primary first "
                f"(`adapterctl promote {name}:VERSION {alias}`), then add a canary"
            )
        if state.version == version:
            raise InvalidArgument(f"{name}:{version} is already the primary of {name}:{alias}")
        canary = Canary(version, weight)
        if state.canary == canary:
            return state
        return self._write(name, alias, state.version, state.history, canary, state, by, "canary")

    def rollback(self, name: str, alias: str, by: str) -> int:
        """Drop the canary if there is one (the primary keeps all traffic); otherwise
        move ``alias`` back to its previous live primary. Returns the primary now."""
        state = self.state(name, alias)
        if state.canary is not None:
            self._write(name, alias, state.version, state.history, None, state, by, "drop-canary")
            return state.version
        history = list(state.history)
        while history:
            candidate = history.pop()
            try:
                self.versions.read(name, candidate)
            except NotFound:  # deleted with --force since; skip it
                continue
            self._write(name, alias, candidate, history, None, state, by, "rollback")
            return candidate
        raise FailedPrecondition(f"alias {name}:{alias} has no earlier target to roll back to")

    def _check(self, name: str, version: int, alias: str) -> None:
        validate_name(name)
        if validate_alias(alias) == LATEST:
            raise InvalidArgument("'latest' is implicit (the newest version) and cannot be promoted")
        self.versions.read(name, version)  # NotFound for unknown or deleted versions

    def _write(self, name: str, alias: str, version: int, history: list[int], canary: Canary | None,
               state: AliasState | None, by: str, action: str) -> AliasState:
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        change = {"at": now, "by": by, "action": action, "version": version,
                  "canary": canary.to_dict() if canary else None}
        changes = [*(state.changes if state else []), change][-MAX_HISTORY:]
        doc = encode({
            "format": ALIAS_FORMAT, "name": name, "alias": alias, "version": version, "history": history,
            "canary": canary.to_dict() if canary else None, "changes": changes,
            "updated": now, "updated_by": by,
        })
        key = layout.alias_key(name, alias)
        try:
            if state is None:
                etag = self.store.put_if_absent(key, doc)
            else:
                etag = self.store.put_if_match(key, doc, state.etag)
        except (AlreadyExists, Conflict):
            was = f"it no longer points to {name}:{state.version}" if state else "it was created meanwhile"
            raise Conflict(
                f"alias {name}:{alias} was moved by someone else ({was}); "
                f"check `adapterctl show {name}:{alias}` and retry"
            ) from None
        return AliasState(version, history, etag, canary, changes)
