"""The OpenAI routes: ``POST /v1/completions``, ``POST /v1/chat/completions``,
``GET /v1/models``. Each request becomes one :class:`~adapterctl.server.generation.Call`
per (prompt, choice), run through the shared path; this module only translates.

``model`` is the base model's id or an adapter reference (``NAME``, ``NAME:3``,
``NAME:prod``, ``NAME@sha256:...``); responses name what served them: ``model`` is
``NAME:VERSION``, ``system_fingerprint`` and ``x-adapterctl-adapter-digest`` the
manifest digest (the base model's fingerprint for base requests).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import replace
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from adapterctl.server.generation import DEFAULT_SAMPLING, Call, Generations, served_model
from adapterctl.server.http import responses as R
from adapterctl.server.http.errors import APIError, exception_body
from adapterctl.server.http.schemas import ChatBody, CompletionBody, _Generation
from adapterctl.server.http.streaming import merge, peek, sse
from adapterctl.server.interceptors import TokenTable, bearer_token, refusal, status_code
from adapterctl.server.types import GenerationResult, ServedAdapter, TokenEvent

DIGEST_HEADER = "x-adapterctl-adapter-digest"
ROUTING_KEY_HEADER = "x-routing-key"
TIMEOUT_HEADER = "x-adapterctl-timeout"  # seconds; past it the request ends with 504
CLIENT_CLOSED = 499  # the client disconnected before a unary answer
router = APIRouter()


class Frontend:
    """What the routes need: the shared generation path, the token table, a denial counter."""

    def __init__(self, generations: Generations, tokens: TokenTable | None,
                 on_denied: Callable[[str], None] = lambda code: None) -> None:
        self.generations, self.tokens, self.on_denied = generations, tokens, on_denied

    @property
    def tokenizer(self) -> Any:
        return self.generations.engine.tokenizer

    def fingerprint(self, served: ServedAdapter | None) -> str:
        if served is not None:
            return served.digest
        return str(getattr(getattr(self.generations.engine, "base", None), "fingerprint", "") or "")


async def frontend(request: Request) -> Frontend:
    """Dependency: the app's Frontend once the caller passed auth and the serving gate."""
    front: Frontend = request.app.state.frontend
    header = request.headers.get("authorization")
    refused = refusal(front.generations.state, front.tokens, bearer_token([("authorization", header)]))
    if refused is not None:
        code, message = refused
        if code != grpc.StatusCode.UNAVAILABLE:
            front.on_denied(code.name)
        raise APIError(code, message)
    return front


class _Deadline:
    """The optional per-request deadline (TIMEOUT_HEADER) and the status codes it implies."""

    def __init__(self, request: Request) -> None:
        raw = request.headers.get(TIMEOUT_HEADER)
        try:
            self.seconds = float(raw) if raw else None
        except ValueError:
            raise APIError(grpc.StatusCode.INVALID_ARGUMENT, f"{TIMEOUT_HEADER} must be a number of seconds")
        if self.seconds is not None and not self.seconds > 0:
            raise APIError(grpc.StatusCode.INVALID_ARGUMENT, f"{TIMEOUT_HEADER} must be > 0")
        self.at = time.monotonic() + self.seconds if self.seconds else None

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def code_of(self, exc: BaseException) -> str:
        if isinstance(exc, asyncio.CancelledError) and self.expired():
            return "DEADLINE_EXCEEDED"
        return status_code(exc).name

    def cancelled(self) -> str:
        return "DEADLINE_EXCEEDED" if self.expired() else "CANCELLED"

    def scope(self):
        """Raises TimeoutError in the block once the deadline passes (an absolute time, so
        the handler and the stream body share one budget)."""
        if self.at is None:
            return contextlib.nullcontext()
        return asyncio.timeout(max(0.0, self.at - time.monotonic()))


def _request_id(request: Request) -> str:
    return (request.headers.get("x-request-id") or uuid.uuid4().hex)[:96]


def _calls(front: Frontend, body: _Generation, rid: str, prompts: list[Call], request: Request) -> list[Call]:
    """One call per (prompt, choice) in OpenAI's choice order; choice j of a seeded request
    uses seed + j; with several, call i's request id is ``rid-i``. The routing key of a
    weighted alias is the ``x-routing-key`` header, else the body's ``user``."""
    base_id = front.generations.base_id
    common: dict[str, Any] = dict(api="http", adapter="" if body.model == base_id else body.model,
                  routing_key=request.headers.get(ROUTING_KEY_HEADER) or body.user or "",
                  response_format=body.response_format.engine_format() if body.response_format else None)
    max_new = (body.max_completion_tokens if isinstance(body, ChatBody) else None) or body.max_tokens or 0
    sampling: dict[str, Any] = dict(max_new_tokens=max_new,
                                    temperature=1.0 if body.temperature is None else body.temperature,
                                    top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
                                    stop=body.stops())
    calls = []
    for p, partial in enumerate(prompts):
        for j in range(body.n):
            index = p * body.n + j
            seed = None if body.seed is None else body.seed + j
            calls.append(replace(partial, **common, sampling=replace(partial.sampling, **sampling, seed=seed),
                                 request_id=rid if len(prompts) * body.n == 1 else f"{rid}-{index}"))
    return calls


async def _respond(front: Frontend, request: Request, rid: str, calls: list[Call], body: _Generation, kind: str,
                   choice: Callable, chunk_choice: Callable) -> Any:
    """The response (JSON, or SSE when ``body.stream``) for ``calls``, in choice order."""
    n, stream, include_usage = body.n, body.stream, body.include_usage
    deadline = _Deadline(request)
    runs = [front.generations.run(c, deadline.code_of, deadline.cancelled) for c in calls]
    created = int(time.time())
    if not stream:
        async with deadline.scope():
            results = await _unless_disconnected(request, _all(runs))
        if results is None:  # nobody is listening; 499 as nginx logs it, for the access log only
            return Response(status_code=CLIENT_CLOSED)
        served = results[0].adapter
        doc = {**R.envelope(kind, rid, created, served_model(served, front.generations.base_id),
                             front.fingerprint(served)),
                "choices": [choice(i, r, front.tokenizer) for i, r in enumerate(results)],
                "usage": _usage(results, n)}
        return JSONResponse(doc, headers=_headers(served))
    events = merge(runs)
    async with deadline.scope():
        (i, first), events = await peek(events)
    served = first.served if isinstance(first, TokenEvent) else first.adapter
    head = R.envelope(kind + ".chunk" if kind.startswith("chat") else kind, rid, created,
                      served_model(served, front.generations.base_id), front.fingerprint(served))

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        results: dict[int, GenerationResult] = {}
        started: set[int] = set()
        async with deadline.scope(), contextlib.aclosing(events) as items:
            async for index, event in items:
                if isinstance(event, GenerationResult):
                    results[index] = event
                yield {**head, "choices": [chunk_choice(index, event, front.tokenizer, index not in started)]}
                started.add(index)
        if include_usage:
            yield {**head, "choices": [], "usage": _usage([results[i] for i in sorted(results)], n)}

    framed = sse(chunks(), lambda exc: exception_body(exc)[1])
    return EventSourceResponse(framed, headers=_headers(served), ping=15)


async def _unless_disconnected(request: Request,
                               work: Awaitable[list[GenerationResult]]) -> list[GenerationResult] | None:
    """``work``'s results, or None with ``work`` cancelled (its rows freed, its calls
    logged CANCELLED) when the client goes away first. Without
    this a unary request kept generating for a client that had timed out (found by the
    HTTP fuzz of ``make reliability``: 124 abandoned requests still running)."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, gone, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the ASGI server reports ``http.disconnect`` (the body was read already:
    the route's model parsed it, so the next message can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _all(runs: list[AsyncIterator[TokenEvent | GenerationResult]]) -> list[GenerationResult]:
    """Every run's result, in order; the first failure cancels the others (their rows are freed)."""
    tasks = [asyncio.ensure_future(_result(r)) for r in runs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _result(run: AsyncIterator[TokenEvent | GenerationResult]) -> GenerationResult:
    async with contextlib.aclosing(run) as events:
        async for event in events:
            if isinstance(event, GenerationResult):
                return event
    raise RuntimeError("engine ended without a result")


def _usage(results: list[GenerationResult], n: int) -> dict[str, int]:
    """Usage with prompt tokens counted once per prompt (its ``n`` choices share it), as OpenAI does."""
    return R.usage(results, sum(r.prompt_tokens for r in results[::n]))


def _headers(served: ServedAdapter | None) -> dict[str, str]:
    return {DIGEST_HEADER: served.digest} if served is not None else {}


def _completion_chunk(index: int, event: Any, tokenizer: Any, first: bool) -> dict[str, Any]:
    if isinstance(event, GenerationResult):
        return {
            "index": index,
            "text": "",
            "logprobs": None,
            "finish_reason": R.FINISH.get(event.finish_reason, "stop"),
        }
    return {"index": index, "text": event.text, "logprobs": R.completion_logprobs(tokenizer, event.logprobs),
            "finish_reason": None}


def _chat_chunk(index: int, event: Any, tokenizer: Any, first: bool) -> dict[str, Any]:
    if isinstance(event, GenerationResult):
        return {
            "index": index,
            "delta": {},
            "logprobs": None,
            "finish_reason": R.FINISH.get(event.finish_reason, "stop"),
        }
    delta: dict[str, Any] = {"content": event.text}
    if first:
        delta["role"] = "assistant"
    return {"index": index, "delta": delta, "logprobs": R.chat_logprobs(tokenizer, event.logprobs),
            "finish_reason": None}


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, front: Frontend = Depends(frontend)) -> Any:
    logprobs = body.logprobs is not None
    asked = replace(DEFAULT_SAMPLING, logprobs=logprobs, top_logprobs=body.logprobs or 0)
    prompts = [Call(api="http", prompt=p, sampling=asked) for p in body.prompts()]
    rid = _request_id(request)
    return await _respond(front, request, rid, _calls(front, body, rid, prompts, request), body, "text_completion",
                          R.completion_choice, _completion_chunk)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request, front: Frontend = Depends(frontend)) -> Any:
    rid = _request_id(request)
    asked = replace(DEFAULT_SAMPLING, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0)
    calls = _calls(front, body, rid, [Call(api="http", messages=body.turns(), sampling=asked)], request)
    return await _respond(front, request, rid, calls, body, "chat.completion", R.chat_choice, _chat_chunk)


@router.get("/v1/models")
async def models(front: Frontend = Depends(frontend)) -> dict[str, Any]:
    """The base model, then one entry per registry adapter name with its versions and aliases."""
    engine = front.generations.engine
    base = getattr(engine, "base", None)
    data = [{"id": front.generations.base_id, "object": "model", "created": 0, "owned_by": "adapterctl",
             "root": front.generations.base_id, "parent": None,
             "fingerprint": str(getattr(base, "fingerprint", "") or "")}]
    by_name: dict[str, dict[str, Any]] = {}
    for row in await engine.list_adapters(None):
        entry = by_name.setdefault(row.name, {"id": row.name, "object": "model", "created": 0,
                                              "owned_by": "adapterctl", "root": front.generations.base_id,
                                              "parent": front.generations.base_id, "versions": [], "aliases": {}})
        entry["versions"].append({"version": row.version, "digest": row.digest, "tier": row.tier})
        for alias in row.aliases:
            entry["aliases"][alias] = row.version
    for name in sorted(by_name):
        by_name[name]["versions"].sort(key=lambda v: v["version"])
        data.append(by_name[name])
    return {"object": "list", "data": data}
