"""Types shared inside ``adapterctl.server``: the engine contract (requests, events,
results), the adapter identity and status rows, the adapter-source and host-weights
protocols, and the observer hooks. ``cache/`` and ``engine/`` import this module and
never each other; ``build.py`` composes them.

The servicer turns a request into a :class:`GenerationRequest` and iterates
``engine.generate(req)``: zero or more :class:`TokenEvent` then exactly one
:class:`GenerationResult`. Cancelling the consuming task (or ``aclose()`` on the
iterator) cancels the request at the next decode step and frees its batch slot.
Engines raise :mod:`adapterctl.errors` domain errors (NotFound for an unknown
adapter, FailedPrecondition for an incompatible one, ResourceExhausted when the
wait queue is full, InvalidArgument for a prompt over the window); the
servicer maps them to gRPC status codes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import torch

from adapterctl.errors import InvalidArgument

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_EOS = "eos"
FINISH_CANCELLED = "cancelled"
MAX_TOP_LOGPROBS = 20  # the OpenAI API's bound
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False  # report each sampled token's log-probability (see TokenLogprob)
    top_logprobs: int = 0  # and the k most likely alternatives, 0..MAX_TOP_LOGPROBS (needs logprobs)

    def validate(self, max_new_tokens_limit: int) -> "SamplingParams":
        """Raise InvalidArgument naming the first bad field; return self."""
        if not 1 <= self.max_new_tokens <= max_new_tokens_limit:
            raise InvalidArgument(f"max_new_tokens must be in [1, {max_new_tokens_limit}], got {self.max_new_tokens}")
        if math.isnan(self.temperature) or self.temperature < 0 or math.isinf(self.temperature):
            raise InvalidArgument(f"temperature must be a finite number >= 0, got {self.temperature}")
        if math.isnan(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise InvalidArgument("stop sequences must not be empty strings")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs")
        return self


@dataclass(frozen=True)
class ResponseFormat:
    """Output constraint: ``json_object`` (any JSON object) or ``json_schema`` (``schema``,
    a JSON Schema as a dict or JSON text); ``text`` means unconstrained."""

    type: str = "text"
    schema: dict | str | None = None

    def validate(self) -> "ResponseFormat | None":
        """None for ``text``, else the format with ``schema`` a dict; InvalidArgument for an
        unknown type or a json_schema without a JSON-object schema."""
        if self.type not in RESPONSE_FORMATS:
            raise InvalidArgument(f"response_format.type must be one of {', '.join(RESPONSE_FORMATS)}, "
                                  f"got {self.type!r}")
        if self.type != "json_schema":
            return None if self.type == "text" else ResponseFormat(self.type)
        schema = self.schema
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidArgument(f"response_format json_schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise InvalidArgument("response_format json_schema needs a schema (a JSON object)")
        return ResponseFormat(self.type, schema)


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token's log-probability under the distribution it was sampled from
    (log_softmax of the logits after the grammar mask and temperature; greedy = T 1),
    and the ``top`` (token_id, logprob) alternatives, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationRequest:
    """``prompt_ids`` are already tokenised (chat templates applied by the caller);
    ``adapter`` is a reference string (``name``, ``name:3``, ``name:prod``,
    ``name@sha256:…``) or None for the base model. ``routing_key`` picks the
    version of a weighted alias (sticky per key; "" = random). ``served`` is set
    by the engine when it resolves ``adapter`` at admission (once: the request
    runs on that version to the end, whatever the alias does meanwhile)."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    routing_key: str = ""
    served: "ServedAdapter | None" = None
    route: str = ""  # "primary" / "canary" when ``adapter`` is an alias, set with ``served``
    response_format: ResponseFormat | None = None  # None = unconstrained


@dataclass(frozen=True)
class ServedAdapter:
    """Exactly which adapter version served a request."""

    name: str
    version: int
    digest: str


@dataclass
class TokenEvent:
    """New tokens for one request; ``text`` is the decoded delta (may be "").
    ``logprobs`` (one per token id) when the request asked; ``served`` on the first event."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    served: ServedAdapter | None = None


@dataclass
class GenerationResult:
    """The final item of a generation: whole completion plus accounting."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # one of FINISH_*
    prompt_tokens: int
    adapter: ServedAdapter | None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class AdapterStatus:
    """One row of ``ListAdapters``: a version and where it is resident."""

    name: str
    version: int
    digest: str
    tier: str  # "device" | "host" | "disk" | "registry"
    pinned: bool = False
    bytes: int = 0
    rank: int = 0
    active_requests: int = 0
    aliases: tuple[str, ...] = ()


class HostAdapter(Protocol):
    """Host-RAM weights of one adapter version (``cache.loaded.LoadedAdapter``), as a
    device slot reads them."""

    served: ServedAdapter
    rank: int
    scale: float
    target_modules: tuple[str, ...]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])
    nbytes: int


class AdapterSource(Protocol):
    """Where an engine gets adapters (``cache.store.AdapterStore``): resolution, host
    weights, residency and alias refresh."""

    async def resolve(self, ref: str, routing_key: str = "") -> ServedAdapter:
        """The exact version ``ref`` names; for a weighted alias, the version ``routing_key``
        sticks to (random per call without a key)."""
        ...

    def route_role(self, ref: str, served: ServedAdapter) -> str:
        """"primary" or "canary" when ``ref`` is a weighted alias that resolved to ``served``,
        else ""."""
        ...

    async def get(self, served: ServedAdapter) -> HostAdapter: ...

    async def pin(self, served: ServedAdapter) -> HostAdapter: ...

    def unpin(self, served: ServedAdapter) -> None: ...

    def unload(self, served: ServedAdapter) -> bool: ...

    async def status(self, name: str | None = None, include_registry: bool = False) -> list[AdapterStatus]: ...

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]: ...

    def close(self) -> None: ...


class Engine(Protocol):
    """What the gRPC layer needs from an engine."""

    tokenizer: object
    max_new_tokens_limit: int
    max_prompt_tokens: int
    features: frozenset[str]  # what it supports beyond plain generation: "logprobs", "response_format"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | GenerationResult]: ...

    async def list_adapters(self, name: str | None = None) -> list[AdapterStatus]: ...

    async def load_adapter(self, ref: str) -> AdapterStatus: ...

    async def unload_adapter(self, ref: str) -> AdapterStatus: ...

    async def pin_adapter(self, ref: str, pinned: bool) -> AdapterStatus: ...

    async def refresh_aliases(self) -> list[tuple[str, str, int, int]]:
        """Re-resolve aliases in use; returns (name, alias, old_version, new_version) changes."""
        ...


class EngineObserver:
    """Hooks the engine and the adapter store call so the server can export metrics without
    either importing Prometheus. Every method is a no-op here; ``metrics.ServerMetrics``
    overrides them. Cache events: the store reports tiers host/disk/registry with the adapter
    NAME, the device slots report tier device with ``NAME:VERSION``."""

    def on_step(self, batch_size: int, batch_tokens: int, running: int, waiting: int, kv_used: float) -> None: ...

    def on_cache(self, tier: str, event: str, adapter: str) -> None:
        """``event`` is "hit", "miss" or "evict"; ``tier`` device|host|disk|registry."""

    def on_load(self, source: str, seconds: float, adapter: str) -> None: ...

    def on_residency(self, tier: str, adapters: int, nbytes: int, pinned: int) -> None: ...

    def on_device_pages(self, used: int, total: int) -> None:
        """Pages of the device LoRA memory held by resident adapters, of ``total`` (slots.py)."""

    def on_queue_rejected(self) -> None: ...

    def on_prefix_cache(self, restored: int, prompt_tokens: int, nbytes: int) -> None:
        """At admission: ``restored`` of the prompt's ``prompt_tokens`` came from the prefix
        cache (the rest is prefilled); ``nbytes`` is the cache's size in bytes."""
