"""Labels set after publish (``eval.loss=1.23``, ``approved=yes``): one JSON object per
version, kept beside the immutable manifest and changed only by compare-and-swap.

The manifest's own ``labels`` (given at publish) are part of its digest and never
change; :meth:`Labels.effective` overlays the mutable ones on them. A label update
is a merge of keys, so a lost compare-and-swap is retried on the fresh document
(no update is lost) a bounded number of times, then reported as Conflict.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from adapterctl.errors import AlreadyExists, Conflict, IntegrityError, NotFound
from adapterctl.registry import layout
from adapterctl.registry.manifest import encode
from adapterctl.registry.validate import validate_labels
from adapterctl.registry.versions import Versions

LABELS_FORMAT = "adapterctl.labels/v1"
MAX_ATTEMPTS = 10


class Labels:
    def __init__(self, versions: Versions) -> None:
        self.versions = versions
        self.store = versions.store

    def read(self, name: str, version: int) -> tuple[dict[str, str], str | None]:
        """``(labels set after publish, etag)``; ``({}, None)`` when none were set."""
        try:
            raw, etag = self.store.get(layout.labels_key(name, version))
        except NotFound:
            return {}, None
        try:
            data = json.loads(raw)
            return {str(k): str(v) for k, v in data["labels"].items()}, etag
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"labels of {name}:{version} are malformed: {exc}") from None

    def effective(self, name: str, version: int, published: dict[str, str]) -> dict[str, str]:
        """Publish-time labels overlaid with the ones set since."""
        return {**published, **self.read(name, version)[0]}

    def update(self, name: str, version: int, set_: dict[str, str], remove: tuple[str, ...], by: str) -> dict[str, str]:
        """Merge ``set_`` into (and drop ``remove`` from) the labels of ``name:version``;
        returns the mutable labels now. NotFound for an unknown or deleted version."""
        set_ = validate_labels(set_)
        self.versions.read(name, version)
        key = layout.labels_key(name, version)
        for _ in range(MAX_ATTEMPTS):
            current, etag = self.read(name, version)
            labels = {k: v for k, v in {**current, **set_}.items() if k not in remove}
            doc = encode({"format": LABELS_FORMAT, "name": name, "version": version, "labels": labels,
                          "updated": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "updated_by": by})
            try:
                if etag is None:
                    self.store.put_if_absent(key, doc)
                else:
                    self.store.put_if_match(key, doc, etag)
                return labels
            except (AlreadyExists, Conflict):
                continue  # someone else changed them: merge into their document
        raise Conflict(f"labels of {name}:{version} kept changing concurrently; retry")
