"""asyncio client for the adapterctl gRPC API; same methods and results as
:class:`adapterctl.client.client.Client`, awaitable.

    async with AsyncClient("127.0.0.1:50051") as c:
        stream = c.generate_stream("Hello", adapter="reviews")
        async for chunk in stream:
            print(chunk.text, end="")
        print(stream.result.usage)
"""
from __future__ import annotations

from typing import Any, AsyncIterator

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
from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc


class AsyncGenerationStream:
    """``async for`` yields :class:`Chunk`; then ``result`` holds the final :class:`GenerateResult`."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self.result: GenerateResult | None = None

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for msg in self._call:
                if msg.HasField("final"):
                    self.result = result_from_proto(msg.final)
                else:
                    yield Chunk(msg.chunk.text, tuple(msg.chunk.token_ids))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._call.cancelled():
                return  # we cancelled it
            raise error_from_rpc(exc) from None

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    """Non-blocking client; create it inside the event loop that uses it."""

    def __init__(self, target: str = "127.0.0.1:50051", **options: Any) -> None:
        self.connection = Connection(target, **options)
        self._channel = self.connection.aio_channel()
        self._inference = pb_grpc.InferenceStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, adapter: str = "", timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self.connection.metadata(adapter),
                                timeout=timeout if timeout is not None else self.connection.timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    async def generate(self, prompt: str | None = None, *, timeout: float | None = None,
                       **params: Any) -> GenerateResult:
        request = build_request(prompt, **params)
        return result_from_proto(await self._call(self._inference.Generate, request, request.adapter, timeout))

    async def chat(self, messages: Any, *, timeout: float | None = None, **params: Any) -> GenerateResult:
        return await self.generate(messages=messages, timeout=timeout, **params)

    def generate_stream(self, prompt: str | None = None, *, timeout: float | None = None,
                        **params: Any) -> AsyncGenerationStream:
        request = build_request(prompt, **params)
        call = self._inference.GenerateStream(
            request, metadata=self.connection.metadata(request.adapter),
            timeout=timeout if timeout is not None else self.connection.timeout)
        return AsyncGenerationStream(call)

    async def list_adapters(self, name: str = "") -> list[AdapterInfo]:
        reply = await self._call(self._admin.ListAdapters, pb.ListAdaptersRequest(name=name))
        return [info_from_proto(a) for a in reply.adapters]

    async def load_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(await self._call(self._admin.LoadAdapter, pb.AdapterRequest(adapter=ref), ref))

    async def unload_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(await self._call(self._admin.UnloadAdapter, pb.AdapterRequest(adapter=ref), ref))

    async def pin_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(await self._call(self._admin.PinAdapter, pb.AdapterRequest(adapter=ref), ref))

    async def unpin_adapter(self, ref: str) -> AdapterInfo:
        return info_from_proto(await self._call(self._admin.UnpinAdapter, pb.AdapterRequest(adapter=ref), ref))

    async def refresh_aliases(self) -> list[AliasChange]:
        return changes_from_proto(await self._call(self._admin.RefreshAliases, pb.RefreshAliasesRequest()))

    async def health(self, service: str = "", timeout: float = 5.0) -> str:
        reply = await self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
