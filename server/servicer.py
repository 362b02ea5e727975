"""gRPC servicers: Inference (Generate, GenerateStream) and Admin, over the Engine protocol.

Requests are validated and tokenised here (prompt XOR chat messages, sampling
limits, model window); every Generate call is recorded once in metrics and in one
structured log line. Domain errors propagate to :mod:`.interceptors`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, AsyncIterator

from adapterctl.errors import InvalidArgument
from adapterctl.refs import parse_ref
from adapterctl.server.interceptors import ServingState, status_code
from adapterctl.server.metrics import ServerMetrics
from adapterctl.server.types import (
    FINISH_CANCELLED,
    FINISH_EOS,
    FINISH_LENGTH,
    FINISH_STOP,
    AdapterStatus,
    Engine,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenEvent,
)
from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
request_log = logging.getLogger("adapterctl.server.requests")

ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID = 128
MAX_ROUTING_KEY = 256
_FINISH = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_STOP: pb.FINISH_REASON_STOP,
           FINISH_EOS: pb.FINISH_REASON_EOS, FINISH_CANCELLED: pb.FINISH_REASON_CANCELLED}


def build_sampling(request: pb.GenerateRequest, default_max_new_tokens: int, limit: int) -> SamplingParams:
    """SamplingParams from the request (0 / unset fields take their defaults), validated."""
    return SamplingParams(
        max_new_tokens=request.max_new_tokens or default_max_new_tokens,
        temperature=request.temperature,
        top_p=request.top_p if request.HasField("top_p") else 1.0,
        top_k=request.top_k,
        seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop),
    ).validate(limit)


def prompt_ids(tokenizer: Any, request: pb.GenerateRequest, window: int) -> list[int]:
    """Token ids of ``prompt`` or of ``messages`` rendered with the chat template
    (generation prompt appended); InvalidArgument when over ``window`` tokens."""
    if bool(request.prompt) == bool(request.messages):
        raise InvalidArgument("set exactly one of prompt and messages")
    if request.prompt:
        ids = list(tokenizer(request.prompt).input_ids)
    else:
        turns = []
        for i, m in enumerate(request.messages):
            if m.role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
            turns.append({"role": m.role, "content": m.content})
        try:
            text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja2 errors from the template (e.g. roles must alternate)
            raise InvalidArgument(f"messages cannot be rendered with the chat template: {exc}") from exc
        ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    if len(ids) > window:
        raise InvalidArgument(f"prompt has {len(ids)} tokens; the model window is {window}")
    return ids


def result_proto(result: GenerationResult) -> pb.GenerateResponse:
    served = result.adapter
    return pb.GenerateResponse(
        text=result.text, finish_reason=_FINISH.get(result.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        adapter=pb.ServedAdapter(name=served.name, version=served.version, digest=served.digest) if served else
        pb.ServedAdapter(), request_id=result.request_id, token_ids=result.token_ids)


def status_proto(status: AdapterStatus) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=status.name, version=status.version, digest=status.digest, aliases=list(status.aliases),
                          tier=status.tier, pinned=status.pinned, bytes=status.bytes, rank=status.rank,
                          active_requests=status.active_requests)


def _printable(text: str) -> str:
    """Client-chosen text made safe for one log line (control characters escaped)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _adapter_name(ref: str) -> str | None:
    try:
        return parse_ref(ref).name if ref else None
    except InvalidArgument:
        return "__invalid__"


def _alias(ref: str) -> str | None:
    """The named alias of ``ref`` (``prod`` of ``name:prod``), None for any other reference."""
    try:
        parsed = parse_ref(ref)
    except InvalidArgument:
        return None
    return None if parsed.is_latest or parsed.alias is None else parsed.alias


class InferenceServicer(pb_grpc.InferenceServicer):
    """Generate and GenerateStream over one engine."""

    def __init__(self, engine: Engine | None, metrics: ServerMetrics, default_max_new_tokens: int,
                 max_new_tokens_limit: int, state: ServingState | None = None) -> None:
        self.engine = engine  # set once loaded; the access interceptor refuses calls until then
        self._state = state or ServingState()
        self._metrics = metrics
        self._default_max_new_tokens = default_max_new_tokens
        self._limit = max_new_tokens_limit

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    return result_proto(event)
        raise RuntimeError("engine ended without a result")

    async def GenerateStream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(self._run(request, context)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    yield pb.GenerateStreamResponse(final=result_proto(event))
                elif event.token_ids or event.text:
                    yield pb.GenerateStreamResponse(chunk=pb.TokenChunk(text=event.text, token_ids=event.token_ids))

    def _request(self, request: pb.GenerateRequest, request_id: str) -> GenerationRequest:
        ref = request.adapter.strip()
        if ref:
            parse_ref(ref)
        limit = min(self._limit, self.engine.max_new_tokens_limit)
        sampling = build_sampling(request, min(self._default_max_new_tokens, limit), limit)
        ids = prompt_ids(self.engine.tokenizer, request, self.engine.max_prompt_tokens)
        if len(request.routing_key) > MAX_ROUTING_KEY:
            raise InvalidArgument(f"routing_key is {len(request.routing_key)} characters; at most {MAX_ROUTING_KEY}")
        return GenerationRequest(request_id=request_id, prompt_ids=ids, sampling=sampling, adapter=ref or None,
                                 routing_key=request.routing_key)

    async def _run(self, request: pb.GenerateRequest, context) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Engine events for ``request``; records metrics and one log line however it ends."""
        started = time.monotonic()
        request_id = _printable(request.request_id[:MAX_REQUEST_ID]) or uuid.uuid4().hex
        first_token: float | None = None
        result: GenerationResult | None = None
        code, prompt_len = "OK", 0
        gen_request: GenerationRequest | None = None
        self._state.enter()
        try:
            gen_request = self._request(request, request_id)
            prompt_len = len(gen_request.prompt_ids)
            async with contextlib.aclosing(self.engine.generate(gen_request)) as events:
                async for event in events:
                    if isinstance(event, GenerationResult):
                        result = event
                    elif first_token is None and event.token_ids:
                        first_token = time.monotonic()
                    yield event
        except GeneratorExit:  # closed by the consumer: done after the result, else it went away
            if result is None:
                code = status_code(asyncio.CancelledError(), context).name
            raise
        except BaseException as exc:
            code = status_code(exc, context).name
            raise
        finally:
            self._state.exit()
            self._record(request, request_id, result, code, prompt_len, started, first_token, gen_request)

    def _record(self, request: pb.GenerateRequest, request_id: str, result: GenerationResult | None, code: str,
                prompt_len: int, started: float, first_token: float | None,
                gen_request: GenerationRequest | None = None) -> None:
        latency = time.monotonic() - started
        served = result.adapter if result else gen_request.served if gen_request else None
        name = served.name if served else _adapter_name(request.adapter.strip())
        completion = result.completion_tokens if result else 0
        ttft = first_token - started if first_token is not None else None
        self._metrics.observe_request(name, code, prompt_len, completion, latency, ttft)
        alias = _alias(request.adapter.strip()) if served else None
        if alias:
            self._metrics.observe_alias_request(served.name, alias, served.version, gen_request.route if gen_request
                                                else "", code, latency, ttft)
        request_log.info("generate %s", code, extra={
            "request_id": request_id, "adapter": name or "", "adapter_ref": _printable(request.adapter[:200]),
            "version": served.version if served else None, "digest": served.digest if served else None,
            "prompt_tokens": prompt_len, "completion_tokens": completion,
            "finish_reason": result.finish_reason if result else None, "latency_ms": round(latency * 1000, 1),
            "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None, "status": code,
            "route": gen_request.route if gen_request else ""})


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
