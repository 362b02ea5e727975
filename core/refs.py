"""Adapter names and references: the one parser every layer uses.

Grammar (``latest`` is the implicit alias)::

    NAME                    latest version
    NAME:VERSION            integer >= 1
    NAME:ALIAS              alias such as ``prod``
    NAME@sha256:DIGEST      a manifest digest (64 lowercase hex)

Names become storage keys and file paths, so they are validated here and only
here: 1-128 characters of ``[A-Za-z0-9._-]``, starting with a letter or digit,
no ``..``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from adapterctl.errors import InvalidArgument

MAX_NAME_LEN = 128
LATEST = "latest"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def validate_name(name: str, what: str = "adapter name") -> str:
    """Return ``name`` if it is safe as a key/path component, else raise InvalidArgument."""
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{what} must not be empty")
    if len(name) > MAX_NAME_LEN:
        raise InvalidArgument(f"{what} {name[:20]!r}... is longer than {MAX_NAME_LEN} characters")
    if ".." in name or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid {what} {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..' or '/'"
        )
    return name


def validate_alias(alias: str) -> str:
    """Aliases start with a letter (so they never look like a version number)."""
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise InvalidArgument(
            f"invalid alias {alias!r}: start with a letter, then letters, digits, '_' or '-' (max 64)"
        )
    return alias


def validate_digest(digest: str) -> str:
    if not _DIGEST_RE.fullmatch(digest or ""):
        raise InvalidArgument(f"invalid digest {digest!r}: expected sha256:<64 lowercase hex>")
    return digest


@dataclass(frozen=True)
class AdapterRef:
    """A parsed reference. At most one of ``version``, ``alias``, ``digest`` is set;
    none set means ``latest``."""

    name: str
    version: int | None = None
    alias: str | None = None
    digest: str | None = None

    @property
    def is_latest(self) -> bool:
        return self.version is None and self.digest is None and self.alias in (None, LATEST)

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}:{self.version}"
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        if self.alias is not None and self.alias != LATEST:
            return f"{self.name}:{self.alias}"
        return self.name


def parse_ref(text: str) -> AdapterRef:
    """Parse ``NAME``, ``NAME:VERSION``, ``NAME:ALIAS`` or ``NAME@sha256:HEX``.

    Raises InvalidArgument with one line naming what is wrong.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument("adapter reference must not be empty")
    text = text.strip()
    if "@" in text:
        name, _, digest = text.partition("@")
        return AdapterRef(validate_name(name), digest=validate_digest(digest))
    name, sep, tag = text.partition(":")
    validate_name(name)
    if not sep:
        return AdapterRef(name)
    if not tag:
        raise InvalidArgument(f"invalid reference {text!r}: nothing after ':'")
    if tag.isdigit():
        version = int(tag)
        if version < 1:
            raise InvalidArgument(f"invalid reference {text!r}: versions start at 1")
        return AdapterRef(name, version=version)
    if tag == LATEST:
        return AdapterRef(name)
    return AdapterRef(name, alias=validate_alias(tag))
