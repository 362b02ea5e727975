"""The request path both front ends share (gRPC servicer, HTTP routes): validation,
tokenisation, the serving gate, the engine call, metrics and the one request log line.

A front end turns its wire request into a :class:`Call`, iterates :meth:`Generations.run`
(zero or more TokenEvents, then one GenerationResult) and only formats what it gets;
domain errors propagate and each front end maps them (:mod:`.interceptors`).
"""
from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Callable

from adapterctl.errors import FailedPrecondition, InvalidArgument
from adapterctl.refs import parse_ref
from adapterctl.server.interceptors import ServingState
from adapterctl.server.metrics import ServerMetrics
from adapterctl.server.types import (
    Engine,
    GenerationRequest,
    GenerationResult,
    ResponseFormat,
    SamplingParams,
    ServedAdapter,
    TokenEvent,
)

request_log = logging.getLogger("adapterctl.server.requests")

ROLES = ("system", "user", "assistant")
MAX_REQUEST_ID = 128
MAX_ROUTING_KEY = 256
# Engine.features names what an engine supports beyond plain generation.
LOGPROBS, RESPONSE_FORMAT = "logprobs", "response_format"


DEFAULT_SAMPLING = SamplingParams(max_new_tokens=0)  # 0 new tokens: the server's default


@dataclass
class Call:
    """One generation request, whichever API it came through; exactly one of ``prompt`` and
    ``messages`` is set. ``sampling.max_new_tokens`` 0 takes the server default; the rest of
    ``sampling`` is validated as the engine will use it."""

    api: str  # "grpc" | "http": the metrics label
    adapter: str = ""  # reference (NAME, NAME:3, NAME:prod, NAME@sha256:...); "" = base model
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) turns
    sampling: SamplingParams = DEFAULT_SAMPLING
    request_id: str = ""
    response_format: ResponseFormat | None = None
    routing_key: str = ""  # sticky version choice for a weighted (canary) alias; "" = random


def printable(text: str) -> str:
    """Client-chosen text made safe for one log line (control characters escaped)."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def served_model(served: ServedAdapter | None, base_id: str) -> str:
    """What served a request, as a model name: ``NAME:VERSION``, or the base model's id."""
    return f"{served.name}:{served.version}" if served else base_id


def token_text(tokenizer: Any, token_id: int) -> str:
    """The text of one token on its own (for logprob listings)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


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


class Generations:
    """Runs :class:`Call` s on the engine; one instance serves both front ends."""

    def __init__(self, engine: Engine | None, metrics: ServerMetrics, default_max_new_tokens: int,
                 max_new_tokens_limit: int, state: ServingState | None = None) -> None:
        self.engine = engine  # set once loaded; both front ends refuse calls until then
        self.state = state or ServingState()
        self.metrics = metrics
        self._default_max_new_tokens = default_max_new_tokens
        self._limit = max_new_tokens_limit

    @property
    def base_id(self) -> str:
        return str(getattr(getattr(self.engine, "base", None), "id", "") or "base")

    def request(self, call: Call, request_id: str) -> GenerationRequest:
        """The engine request for ``call``, validated (InvalidArgument names the bad field)."""
        ref = call.adapter.strip()
        if ref:
            parse_ref(ref)
        features = self.engine.features
        if call.sampling.logprobs and LOGPROBS not in features:
            raise FailedPrecondition(f"this server's engine ({type(self.engine).__name__}) does not report logprobs")
        fmt = call.response_format.validate() if call.response_format else None
        if fmt is not None and RESPONSE_FORMAT not in features:
            raise FailedPrecondition(f"this server's engine ({type(self.engine).__name__}) does not support "
                                     "response_format")
        limit = min(self._limit, self.engine.max_new_tokens_limit)
        wanted = call.sampling.max_new_tokens or min(self._default_max_new_tokens, limit)
        sampling = replace(call.sampling, max_new_tokens=wanted).validate(limit)
        ids = self.prompt_ids(call)
        if len(call.routing_key) > MAX_ROUTING_KEY:
            raise InvalidArgument(f"routing_key is {len(call.routing_key)} characters; at most {MAX_ROUTING_KEY}")
        return GenerationRequest(request_id=request_id, prompt_ids=ids, sampling=sampling, adapter=ref or None,
                                 response_format=fmt, routing_key=call.routing_key)

    def prompt_ids(self, call: Call) -> list[int]:
        """Token ids of ``prompt`` or of ``messages`` rendered with the chat template
        (generation prompt appended); InvalidArgument when over the model window."""
        tokenizer: Any = self.engine.tokenizer
        window = self.engine.max_prompt_tokens
        if bool(call.prompt) == bool(call.messages):
            raise InvalidArgument("set exactly one of prompt and messages")
        if call.prompt:
            ids = list(tokenizer(call.prompt).input_ids)
        else:
            turns = []
            for i, (role, content) in enumerate(call.messages):
                if role not in ROLES:
                    raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
                turns.append({"role": role, "content": content})
            try:
                text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # jinja2 errors from the template (e.g. roles must alternate)
                raise InvalidArgument(f"messages cannot be rendered with the chat template: {exc}") from exc
            ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        if len(ids) > window:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; the model window is {window}")
        return ids

    async def run(self, call: Call, code_of: Callable[[BaseException], str],
                  cancelled_code: Callable[[], str]) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Engine events for ``call``; records metrics and one log line however it ends.
        ``code_of(exc)`` names the status an error ends the call with; ``cancelled_code()``
        the status when the consumer closes the iterator before the result."""
        started = time.monotonic()
        request_id = printable(call.request_id[:MAX_REQUEST_ID]) or uuid.uuid4().hex
        first_token: float | None = None
        result: GenerationResult | None = None
        code, prompt_len = "OK", 0
        gen_request: GenerationRequest | None = None
        self.state.enter()
        try:
            gen_request = self.request(call, request_id)
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
                code = cancelled_code()
            raise
        except BaseException as exc:
            code = code_of(exc)
            raise
        finally:
            self.state.exit()
            self._record(call, request_id, result, code, prompt_len, started, first_token, gen_request)

    def _record(self, call: Call, request_id: str, result: GenerationResult | None, code: str, prompt_len: int,
                started: float, first_token: float | None, gen_request: GenerationRequest | None) -> None:
        latency = time.monotonic() - started
        served = result.adapter if result else gen_request.served if gen_request else None
        name = served.name if served else _adapter_name(call.adapter.strip())
        completion = result.completion_tokens if result else 0
        ttft = first_token - started if first_token is not None else None
        route = gen_request.route if gen_request else ""
        self.metrics.observe_request(name, code, prompt_len, completion, latency, ttft, api=call.api)
        alias = _alias(call.adapter.strip()) if served else None
        if served and alias:
            self.metrics.observe_alias_request(served.name, alias, served.version, route, code, latency, ttft)
        request_log.info("generate %s", code, extra={
            "request_id": request_id, "api": call.api, "adapter": name or "",
            "adapter_ref": printable(call.adapter[:200]),
            "version": served.version if served else None, "digest": served.digest if served else None,
            "prompt_tokens": prompt_len, "completion_tokens": completion,
            "finish_reason": result.finish_reason if result else None, "latency_ms": round(latency * 1000, 1),
            "ttft_ms": round(ttft * 1000, 1) if ttft is not None else None, "status": code, "route": route})
