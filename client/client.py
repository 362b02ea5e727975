"""Synchronous Python client for the adapterctl gRPC API (typed results, domain errors).

    with Client("127.0.0.1:50051", token="...") as c:
        print(c.generate("Hello", adapter="reviews:prod", max_new_tokens=32).text)
        for chunk in (stream := c.generate_stream("Hello")):
            print(chunk.text, end="")
        print(stream.result.finish_reason)
        for r in c.compare("Hello", adapters=["reviews:3", "reviews:4", ""]):  # "" = base model
            print(r.adapter, r.text)
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapterctl.client.types import (
    AdapterInfo,
    AliasChange,
    Chunk,
    Connection,
    GenerateResult,
    build_request,
    changes_from_proto,
    error_from_rpc,
    info_from_proto,
    result_from_proto,
)
from adapterctl.errors import AdapterctlError, InvalidArgument
from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc


class GenerationStream:
    """Iterate for :class:`Chunk` objects; ``result`` is the final :class:`GenerateResult`
    once iteration ends. ``cancel()`` stops the generation on the server."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.result: GenerateResult | None = None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for msg in self._call:
                if msg.HasField("final"):
                    self.result = result_from_proto(msg.final)
                else:
                    yield Chunk(msg.chunk.text, tuple(msg.chunk.token_ids))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return
            raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        self._call.cancel()

    def text(self) -> str:
        """Consume the stream; return the whole text."""
        for _ in self:
            pass
        return self.result.text if self.result else ""


class Client:
    """Blocking client; see :class:`adapterctl.client.types.Connection` for the options."""

    def __init__(self, target: str = "127.0.0.1:50051", **options: Any) -> None:
        self.connection = Connection(target, **options)
        self._channel = self.connection.channel()
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, adapter: str = "", timeout: float | None = None, **kw: Any) -> Any:
        try:
            return method(request, metadata=self.connection.metadata(adapter),
                          timeout=timeout if timeout is not None else self.connection.timeout, **kw)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None

    # ---- inference --------------------------------------------------------------------
    def generate(self, prompt: str | None = None, *, timeout: float | None = None, **params: Any) -> GenerateResult:
        """Generate a completion for ``prompt`` or ``messages=[...]``; see ``build_request`` for params."""
        request = build_request(prompt, **params)
        return result_from_proto(self._call(self._inference.Generate, request, request.adapter, timeout))

    def compare(self, prompt: str | None = None, *, adapters: Sequence[str], timeout: float | None = None,
                **params: Any) -> list[GenerateResult]:
        """The same request once per reference in ``adapters`` ("" = the base model), sent
        concurrently (the server batches them); results in the order of ``adapters``.
        Raises the first failure (in that order) after every call has finished."""
        if not adapters:
            raise InvalidArgument("compare needs at least one adapter reference")
        requests = [build_request(prompt, adapter=ref, **params) for ref in adapters]
        futures = [self._call(self._inference.Generate.future, r, r.adapter, timeout) for r in requests]
        results: list[GenerateResult] = []
        failure: AdapterctlError | None = None
        for future in futures:
            try:
                results.append(result_from_proto(future.result()))
            except grpc.RpcError as exc:
                failure = failure or error_from_rpc(exc)
        if failure is not None:
            raise failure
        return results

    def chat(self, messages: Any, *, timeout: float | None = None, **params: Any) -> GenerateResult:
        return self.generate(messages=messages, timeout=timeout, **params)

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **params: Any) -> GenerationStream:
        request = build_request(prompt, **params)
        call = self._call(self._inference.GenerateStream, request, request.adapter, timeout)
        return GenerationStream(call)

    # ---- admin ------------------------------------------------------------------------
    def list_adapters(self, name: str = "") -> list[AdapterInfo]:
        reply = self._call(self._admin.ListAdapters, pb.ListAdaptersRequest(name=name))
        return [info_from_proto(a) for a in reply.adapters]

    def load_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(self._call(self._admin.LoadAdapter, pb.AdapterRequest(adapter=ref), ref))

    def unload_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(self._call(self._admin.UnloadAdapter, pb.AdapterRequest(adapter=ref), ref))

    def pin_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(self._call(self._admin.PinAdapter, pb.AdapterRequest(adapter=ref), ref))

    def unpin_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(self._call(self._admin.UnpinAdapter, pb.AdapterRequest(adapter=ref), ref))

    def refresh_aliases(self) -> list[AliasChange]:
        return changes_from_proto(self._call(self._admin.RefreshAliases, pb.RefreshAliasesRequest()))

    # ---- health -----------------------------------------------------------------------
    def health(self, service: str = "", timeout: float = 5.0) -> str:
        """"SERVING", "NOT_SERVING", ... (grpc.health.v1 status name)."""
        reply = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the server's health is SERVING (watching it, not polling); raises
        DeadlineExceeded after ``timeout`` seconds."""
        request = health_pb2.HealthCheckRequest(service="")
        stream = self._call(self._health.Watch, request, timeout=timeout, wait_for_ready=True)
        try:
            for reply in stream:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        finally:
            stream.cancel()
        raise AdapterctlError(f"{self.connection.target} closed the health watch before SERVING")
