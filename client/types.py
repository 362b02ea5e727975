"""Typed results of the adapterctl API, request building, channel set-up and the
mapping of gRPC status codes back to :mod:`adapterctl.errors` — shared by the sync
and asyncio clients."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import grpc

from adapterctl import errors
from adapterctl.v1 import adapterctl_pb2 as pb

FINISH_REASONS = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_EOS: "eos",
                  pb.FINISH_REASON_CANCELLED: "cancelled", pb.FINISH_REASON_UNSPECIFIED: "unspecified"}
ADAPTER_METADATA_KEY = "x-adapter"  # lets a proxy hash requests for one adapter onto one replica


@dataclass(frozen=True)
class Message:
    """One chat turn; ``role`` is "system", "user" or "assistant"."""

    role: str
    content: str


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    version: int
    digest: str


@dataclass(frozen=True)
class GenerateResult:
    """A finished generation. ``adapter`` is None when the base model served it."""

    text: str
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    adapter: ServedAdapter | None
    request_id: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """Streamed text delta (may be "" while a character is incomplete) and its tokens."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    version: int
    digest: str
    aliases: tuple[str, ...]
    tier: str  # "device" | "host" | "disk" | "registry"
    pinned: bool
    bytes: int
    rank: int
    active_requests: int


@dataclass(frozen=True)
class AliasChange:
    name: str
    alias: str
    old_version: int
    new_version: int


class DeadlineExceeded(errors.AdapterctlError):
    status = "DEADLINE_EXCEEDED"


class RpcFailed(errors.AdapterctlError):
    """Any other gRPC failure; ``status`` is the status code name."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


_ERRORS = {cls.status: cls for cls in (
    errors.InvalidArgument, errors.NotFound, errors.AlreadyExists, errors.Conflict, errors.FailedPrecondition,
    errors.IntegrityError, errors.ResourceExhausted, errors.Unavailable, errors.Unauthenticated,
    errors.PermissionDenied, DeadlineExceeded)}


def error_from_rpc(exc: grpc.RpcError) -> errors.AdapterctlError:
    """The domain error for a failed call (its class carries the status code name)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    message = f"{code.name}: {details}"
    cls = _ERRORS.get(code.name)
    return cls(message) if cls else RpcFailed(code.name, message)


def result_from_proto(msg: pb.GenerateResponse) -> GenerateResult:
    served = msg.adapter
    return GenerateResult(
        text=msg.text, finish_reason=FINISH_REASONS.get(msg.finish_reason, "unspecified"),
        prompt_tokens=msg.usage.prompt_tokens, completion_tokens=msg.usage.completion_tokens,
        adapter=ServedAdapter(served.name, served.version, served.digest) if served.name else None,
        request_id=msg.request_id, token_ids=tuple(msg.token_ids))


def info_from_proto(msg: pb.AdapterInfo) -> AdapterInfo:
    return AdapterInfo(msg.name, msg.version, msg.digest, tuple(msg.aliases), msg.tier, msg.pinned, msg.bytes,
                       msg.rank, msg.active_requests)


def changes_from_proto(msg: pb.RefreshAliasesResponse) -> list[AliasChange]:
    return [AliasChange(c.name, c.alias, c.old_version, c.new_version) for c in msg.changed]


def _message(m: Message | Mapping[str, str] | Sequence[str]) -> pb.ChatMessage:
    if isinstance(m, Message):
        return pb.ChatMessage(role=m.role, content=m.content)
    if isinstance(m, Mapping):
        return pb.ChatMessage(role=m["role"], content=m["content"])
    role, content = m
    return pb.ChatMessage(role=role, content=content)


def build_request(prompt: str | None = None, *, messages: Iterable[Any] | None = None, adapter: str = "",
                  max_new_tokens: int = 0, temperature: float = 0.0, top_p: float | None = None, top_k: int = 0,
                  seed: int | None = None, stop: Iterable[str] = (), request_id: str = "",
                  routing_key: str = "") -> pb.GenerateRequest:
    """A GenerateRequest; pass ``prompt`` or ``messages`` (Message, {"role","content"} or (role, content)).
    ``routing_key`` (an end-user id) keeps a weighted alias on one version for that key."""
    req = pb.GenerateRequest(adapter=adapter or "", prompt=prompt or "", max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, stop=list(stop), request_id=request_id,
                             routing_key=routing_key)
    if messages is not None:
        req.messages.extend(_message(m) for m in messages)
    if top_p is not None:
        if math.isnan(top_p):
            raise errors.InvalidArgument("top_p must be a number")
        req.top_p = top_p
    if seed is not None:
        req.seed = seed
    return req


@dataclass
class Connection:
    """Where and how to connect: TLS (``root_certificates`` implies it; ``client_cert``/``client_key``
    for mTLS), a bearer ``token``, a default per-call ``timeout`` in seconds."""

    target: str = "127.0.0.1:50051"
    token: str | None = None
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    client_cert: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = None
    server_name: str | None = None  # TLS name to verify instead of the target host
    timeout: float | None = None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.client_cert):
            return None
        return grpc.ssl_channel_credentials(_bytes(self.root_certificates), _bytes(self.client_key),
                                            _bytes(self.client_cert))

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self, adapter: str = "") -> list[tuple[str, str]]:
        md = [("authorization", f"Bearer {self.token}")] if self.token else []
        name = adapter.split("@", 1)[0].split(":", 1)[0].strip()
        if name:
            md.append((ADAPTER_METADATA_KEY, name))
        return md

    def channel(self) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(self.target, options=self.options())
        return grpc.secure_channel(self.target, creds, options=self.options())

    def aio_channel(self) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(self.target, options=self.options())
        return grpc.aio.secure_channel(self.target, creds, options=self.options())


def _bytes(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
