"""Server interceptors: the ONE mapping from domain errors to gRPC status codes (and from
those to HTTP statuses for the HTTP front end), and access control (serving state gate +
bearer-token roles, shared by both front ends through :func:`refusal`).

Health and reflection are never gated or authenticated, so probes and grpcurl
``list`` work while loading, draining or without a token.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

import grpc

from adapterctl.errors import AdapterctlError, InvalidArgument

log = logging.getLogger(__name__)

INFERENCE_PREFIX = "/adapterctl.v1.Inference/"
ADMIN_PREFIX = "/adapterctl.v1.Admin/"
ROLES = ("infer", "admin")  # admin implies infer

LOADING, SERVING, DRAINING = "loading", "serving", "draining"


def status_code(exc: BaseException, context: Any = None) -> grpc.StatusCode:
    """The gRPC status for an exception: domain errors carry their own; a cancelled
    call is DEADLINE_EXCEEDED when its deadline passed, else CANCELLED."""
    if isinstance(exc, AdapterctlError):
        return grpc.StatusCode[exc.status]
    if isinstance(exc, TimeoutError):  # an HTTP request's deadline (asyncio.timeout)
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining() if context is not None else None
        return (
            grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
        )
    if isinstance(exc, grpc.aio.AbortError) and context is not None and context.code() is not None:
        return context.code()
    return grpc.StatusCode.INTERNAL


# gRPC status name -> (HTTP status, OpenAI error ``type``). Unlisted codes are 500.
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "ABORTED": (409, "conflict_error"),
    "FAILED_PRECONDITION": (412, "failed_precondition_error"),  # e.g. an adapter built for another base
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "CANCELLED": (499, "cancelled"),
    "UNAVAILABLE": (503, "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout"),
}


def http_status(code: grpc.StatusCode) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for a gRPC status code."""
    return HTTP_STATUS.get(code.name, (500, "internal_error"))


class ServingState:
    """Process phase: ``loading`` -> ``serving`` -> ``draining``; only ``serving`` accepts RPCs.
    Also counts in-flight generations (event-loop thread only) so a drain can end early."""

    def __init__(self) -> None:
        self.phase = LOADING
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def accepting(self) -> bool:
        return self.phase == SERVING

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class TokenTable:
    """Bearer tokens -> role, from a file of ``TOKEN ROLE`` lines (``#`` comments).
    Only sha256 digests of the tokens are kept in memory."""

    def __init__(self, entries: dict[str, str]) -> None:
        self._roles = {hashlib.sha256(t.encode()).digest(): r for t, r in entries.items()}

    @classmethod
    def from_file(cls, path: Path) -> "TokenTable":
        entries: dict[str, str] = {}
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ROLES:
                raise InvalidArgument(f"{path}:{lineno}: expected 'TOKEN ROLE' with ROLE one of {', '.join(ROLES)}")
            entries[parts[0]] = parts[1]
        if not entries:
            raise InvalidArgument(f"{path}: no tokens")
        return cls(entries)

    def role(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        for known, role in self._roles.items():  # constant time per comparison
            if hmac.compare_digest(known, digest):
                return role
        return None


def bearer_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def refusal(state: "ServingState", tokens: "TokenTable | None", token: str | None,
            admin: bool = False) -> tuple[grpc.StatusCode, str] | None:
    """Why a call with bearer ``token`` is refused (code, message), or None to let it in:
    UNAUTHENTICATED without a known token, PERMISSION_DENIED for an admin call without
    the admin role, UNAVAILABLE unless serving. One rule for gRPC and HTTP."""
    if tokens is not None:
        role = tokens.role(token) if token else None
        if role is None:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        if admin and role != "admin":
            return grpc.StatusCode.PERMISSION_DENIED, "this RPC needs an admin token"
    if not state.accepting:
        why = "the model is still loading" if state.phase == LOADING else "the server is shutting down"
        return grpc.StatusCode.UNAVAILABLE, why
    return None


class AccessInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Inference/Admin RPCs: UNAUTHENTICATED without a known token,
    PERMISSION_DENIED for Admin without the admin role, UNAVAILABLE unless serving."""

    def __init__(self, state: ServingState, tokens: TokenTable | None,
                 on_denied: Callable[[str], None] = lambda code: None) -> None:
        self._state, self._tokens, self._on_denied = state, tokens, on_denied

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or not method.startswith((INFERENCE_PREFIX, ADMIN_PREFIX)):
            return handler
        refused = refusal(self._state, self._tokens, bearer_token(details.invocation_metadata),
                          admin=method.startswith(ADMIN_PREFIX))
        if refused is None:
            return handler
        code, message = refused
        if code != grpc.StatusCode.UNAVAILABLE:
            self._on_denied(code.name)
        return _refusing(handler, code, message)


class Undecodable:
    """What a request deserializer returns for bytes that are not the request message
    (grpc would answer UNKNOWN for the exception); the handler answers INVALID_ARGUMENT."""

    def __init__(self, exc: Exception) -> None:
        self.error = f"request is not a valid protobuf message: {exc}"


def _tolerant(deserializer):
    def deserialize(raw: bytes):
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError and friends: the client sent garbage
            return Undecodable(exc)

    return deserialize


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors raised by handlers into their status code; anything
    unexpected is logged and becomes INTERNAL with a generic message. Undecodable
    request bytes become INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None:
            return handler
        if handler.request_deserializer is not None:
            handler = handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=_wrap_unary(handler.unary_unary, details.method))
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=_wrap_stream(handler.unary_stream, details.method))
        return handler


def _client_gone(context) -> bool:
    """The call was cancelled or its deadline passed: no status can reach the client any more."""
    remaining = context.time_remaining()
    return context.cancelled() or (remaining is not None and remaining <= 0)


async def _abort_for(exc: Exception, context, method: str) -> None:
    if _client_gone(context):  # grpc already answered CANCELLED / DEADLINE_EXCEEDED; aborting would fail
        log.debug("%s ended after its client went away: %s: %s", method, type(exc).__name__, exc)
        raise asyncio.CancelledError()
    if isinstance(exc, AdapterctlError):
        await context.abort(status_code(exc), str(exc))
    log.exception("unexpected error in %s", method)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log")


def _wrap_unary(behavior, method: str):
    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return unary


def _wrap_stream(behavior, method: str):
    async def stream(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, method)

    return stream


def _refusing(handler, code: grpc.StatusCode, message: str):
    """A handler of the same shape as ``handler`` that aborts with ``code``."""

    async def unary(request, context):
        await context.abort(code, message)

    async def streaming(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary)
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming)
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary)
    return handler._replace(stream_stream=streaming)
