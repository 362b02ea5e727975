"""gRPC servicers: Inference (Generate, GenerateStream) and Admin, over the Engine protocol.

A GenerateRequest becomes a :class:`~.generation.Call`; validation, tokenisation, the
engine call, metrics and the request log are the shared path in :mod:`.generation`.
Domain errors propagate to :mod:`.interceptors`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator

from adapterctl.refs import parse_ref
from adapterctl.server.generation import Call, Generations, token_text
from adapterctl.server.interceptors import status_code
from adapterctl.server.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    AdapterStatus,
    Engine,
    GenerationResult,
    ResponseFormat,
    SamplingParams,
    TokenLogprob,
)
from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_FINISH = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_STOP: pb.FINISH_REASON_STOP,
           FINISH_EOS: pb.FINISH_REASON_EOS, FINISH_CANCELLED: pb.FINISH_REASON_CANCELLED}


def call_of(request: pb.GenerateRequest) -> Call:
    """The API-neutral call for a GenerateRequest (unset fields take their defaults)."""
    fmt = None
    if request.HasField("response_format") and request.response_format.type not in ("", "text"):
        fmt = ResponseFormat(request.response_format.type, request.response_format.json_schema or None)
    sampling = SamplingParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                              top_p=request.top_p if request.HasField("top_p") else 1.0, top_k=request.top_k,
                              seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
                              logprobs=request.logprobs, top_logprobs=request.top_logprobs)
    return Call(api="grpc", adapter=request.adapter, prompt=request.prompt,
                messages=tuple((m.role, m.content) for m in request.messages), sampling=sampling,
                request_id=request.request_id, response_format=fmt, routing_key=request.routing_key)


def logprobs_proto(tokenizer: Any, logprobs: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, token=token_text(tokenizer, lp.token_id), logprob=lp.logprob,
                            top_logprobs=[pb.TopLogprob(token_id=t, token=token_text(tokenizer, t), logprob=v)
                                          for t, v in lp.top]) for lp in logprobs or ()]


def result_proto(result: GenerationResult, tokenizer: Any = None) -> pb.GenerateResponse:
    served = result.adapter
    return pb.GenerateResponse(
        text=result.text, finish_reason=_FINISH.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        adapter=pb.ServedAdapter(name=served.name, version=served.version, digest=served.digest) if served else
        pb.ServedAdapter(), request_id=result.request_id, token_ids=result.token_ids,
        logprobs=logprobs_proto(tokenizer, result.logprobs))


def status_proto(status: AdapterStatus) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=status.name, version=status.version, digest=status.digest, aliases=list(status.aliases),
                          tier=status.tier, pinned=status.pinned, bytes=status.bytes, rank=status.rank,
                          active_requests=status.active_requests)


class InferenceServicer(pb_grpc.InferenceServicer):
    """Generate and GenerateStream over the shared :class:`Generations` path."""

    def __init__(self, generations: Generations) -> None:
        self.generations = generations

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return result_proto(event, self.generations.engine.tokenizer)
        raise RuntimeError("engine ended without a result")

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        tokenizer = self.generations.engine.tokenizer
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    yield pb.GenerateStreamResponse(final=result_proto(event, tokenizer))
                elif event.token_ids or event.text:
                    yield pb.GenerateStreamResponse(chunk=pb.TokenChunk(
                        text=event.text, token_ids=event.token_ids, logprobs=logprobs_proto(tokenizer, event.logprobs)))

    def _run(self, request: pb.GenerateRequest, context):
        return self.generations.run(call_of(request), lambda exc: status_code(exc, context).name,
                                    lambda: status_code(asyncio.CancelledError(), context).name)


class AdminServicer(pb_grpc.AdminServicer):
    """Operator RPCs: adapter residency and alias refresh."""

    def __init__(self, engine: Engine | None) -> None:
        self.engine = engine

    async def ListAdapters(self, request: pb.ListAdaptersRequest, context) -> pb.ListAdaptersResponse:
        rows = await self.engine.list_adapters(request.name or None)
        return pb.ListAdaptersResponse(adapters=[status_proto(r) for r in rows])

    async def LoadAdapter(self, request: pb.AdapterRequest, context) -> pb.AdapterInfo:
        return status_proto(await self.engine.load_adapter(_ref(request)))

    async def UnloadAdapter(self, request: pb.AdapterRequest, context) -> pb.AdapterInfo:
        return status_proto(await self.engine.unload_adapter(_ref(request)))

    async def PinAdapter(self, request: pb.AdapterRequest, context) -> pb.AdapterInfo:
        return status_proto(await self.engine.pin_adapter(_ref(request), True))

    async def UnpinAdapter(self, request: pb.AdapterRequest, context) -> pb.AdapterInfo:
        return status_proto(await self.engine.pin_adapter(_ref(request), False))

    async def RefreshAliases(self, request: pb.RefreshAliasesRequest, context) -> pb.RefreshAliasesResponse:
        changes = await self.engine.refresh_aliases()
        return pb.RefreshAliasesResponse(changed=[
            pb.AliasChange(name=n, alias=a, old_version=old, new_version=new) for n, a, old, new in changes])


def _ref(request: pb.AdapterRequest) -> str:
    ref = request.adapter.strip()
    parse_ref(ref)  # InvalidArgument for "" or a malformed reference
    log.info("admin request for adapter %s", ref)
    return ref
