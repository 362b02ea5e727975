"""Domain errors shared by every layer.

Each error carries ``status``, the name of the gRPC status code it maps to, so
the server's single interceptor can translate it without the registry or the
trainer knowing anything about gRPC. The CLI prints ``str(err)`` on one line.
"""
from __future__ import annotations

import contextlib
from typing import Iterator


class AdapterctlError(Exception):
    """Base class; ``status`` is a ``grpc.StatusCode`` name."""

    status = "INTERNAL"


class InvalidArgument(AdapterctlError, ValueError):
    """The caller passed something malformed (bad name, bad reference, bad parameter)."""

    status = "INVALID_ARGUMENT"


class NotFound(AdapterctlError, LookupError):
    """An adapter, version, alias or blob does not exist."""

    status = "NOT_FOUND"


class AlreadyExists(AdapterctlError):
    """A create-only write lost (a version number or blob already taken)."""

    status = "ALREADY_EXISTS"


class Conflict(AdapterctlError):
    """A compare-and-swap lost against a concurrent writer; retry after re-reading."""

    status = "ABORTED"


class FailedPrecondition(AdapterctlError):
    """The request is well-formed but cannot apply in the current state
    (adapter built for another base, unsupported LoRA feature, alias in use)."""

    status = "FAILED_PRECONDITION"


class IntegrityError(AdapterctlError):
    """Stored bytes do not match their recorded sha256 digest."""

    status = "DATA_LOSS"


class ResourceExhausted(AdapterctlError):
    """A bounded queue or cache is full."""

    status = "RESOURCE_EXHAUSTED"


class Unavailable(AdapterctlError):
    """A dependency (registry storage) cannot be reached, or the server is draining."""

    status = "UNAVAILABLE"


class Unauthenticated(AdapterctlError):
    status = "UNAUTHENTICATED"


class PermissionDenied(AdapterctlError):
    status = "PERMISSION_DENIED"


# What parsers (json, int(), dict access, safetensors headers) raise on malformed input.
MALFORMED = (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError)


@contextlib.contextmanager
def malformed_as(error: type[AdapterctlError], what: str, *extra: type[BaseException]) -> Iterator[None]:
    """Re-raise a parser's exception on malformed input (``MALFORMED`` + ``extra``) as ``error``
    with one line naming ``what``; domain errors pass through unchanged."""
    try:
        yield
    except AdapterctlError:
        raise
    except (*MALFORMED, *extra) as exc:
        raise error(f"{what} is malformed ({type(exc).__name__}: {str(exc)[:200]})") from None
