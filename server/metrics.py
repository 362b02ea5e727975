"""Prometheus metrics (prefix ``adapterctl_``) on a private registry, and the
:class:`EngineObserver` the engine and cache report through.

Per-adapter series use the label ``adapter``: the base model is ``__base__``, the
first ``max_adapters`` adapter names that served a request keep their own value,
everything else is ``__other__`` (so label cardinality is bounded).

Per-alias-version series (``adapterctl_alias_*``, for canary decisions) add
``alias``, ``version`` and ``role`` (primary / canary): at most
``MAX_ALIASES_PER_ADAPTER`` aliases per adapter label (then ``__other__``) and the
``MAX_VERSIONS_PER_ALIAS`` most recent versions per alias (an alias has at most
two live versions; older versions' series are removed).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

from adapterctl.server.types import EngineObserver

BASE_LABEL = "__base__"
OTHER_LABEL = "__other__"
TIERS = ("device", "host", "disk", "registry")
AUTH_CODES = ("UNAUTHENTICATED", "PERMISSION_DENIED")  # the codes AccessInterceptor refuses with

# Buckets for LLM serving: a request takes 50 ms .. minutes, the first token 10 ms
# .. tens of seconds (queueing + prefill), one output token 5 ms .. 1 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384)
TOKEN_COUNT_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 32768)
MAX_ALIASES_PER_ADAPTER = 8
MAX_VERSIONS_PER_ALIAS = 4


class AdapterLabels:
    """Maps adapter names to bounded label values (first come, first kept)."""

    def __init__(self, max_adapters: int) -> None:
        self.max_adapters = max_adapters
        self._kept: set[str] = set()
        self._lock = threading.Lock()

    def label(self, name: str | None, claim: bool = True) -> str:
        """Label for ``name`` (None/"" = base model). ``claim=False`` never takes a new
        slot: used for failed requests, so unknown names cannot fill the cap."""
        if not name:
            return BASE_LABEL
        with self._lock:
            if name in self._kept:
                return name
            if claim and len(self._kept) < self.max_adapters:
                self._kept.add(name)
                return name
        return OTHER_LABEL


class AliasVersions:
    """Bounded ``(adapter label, alias) -> recent versions`` bookkeeping; ``admit``
    returns the alias label to use and the label sets whose series must go."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], list[str]] = {}
        self._issued: dict[tuple[str, str, str], set[tuple[str, str]]] = {}  # -> {(role, code)}
        self._lock = threading.Lock()

    def admit(self, adapter: str, alias: str, version: str, role: str, code: str
              ) -> tuple[str, list[tuple[str, str, str, str, str]]]:
        """``(alias label, [(adapter, alias, version, role, code) of series to remove])``."""
        with self._lock:
            known = [a for (ad, a) in self._versions if ad == adapter]
            if alias not in known and len(known) >= MAX_ALIASES_PER_ADAPTER:
                alias = OTHER_LABEL
            versions = self._versions.setdefault((adapter, alias), [])
            if version in versions:
                versions.remove(version)
            versions.append(version)
            dropped, versions[:] = versions[:-MAX_VERSIONS_PER_ALIAS], versions[-MAX_VERSIONS_PER_ALIAS:]
            self._issued.setdefault((adapter, alias, version), set()).add((role, code))
            gone = [(adapter, alias, v, r, c) for v in dropped for r, c in self._issued.pop((adapter, alias, v), ())]
        return alias, gone


class ServerMetrics(EngineObserver):
    """Every adapterctl metric, registered on ``self.registry``."""

    def __init__(self, max_adapters: int = 50, registry: CollectorRegistry | None = None) -> None:
        # *_created samples double the exposition and dashboards never use them.
        # (A process-wide prometheus_client switch; it must precede metric creation.)
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        self.labels = AdapterLabels(max_adapters)
        reg, a = self.registry, ["adapter"]
        self.requests = Counter("adapterctl_requests", "Generate requests finished, by adapter, gRPC status code "
                                "and API (grpc, http).", ["adapter", "code", "api"], registry=reg)
        self.prompt_tokens = Counter("adapterctl_prompt_tokens", "Prompt tokens of finished requests.", a, registry=reg)
        self.generated_tokens = Counter("adapterctl_generated_tokens", "Tokens generated.", a, registry=reg)
        self.latency = Histogram("adapterctl_request_duration_seconds", "Generate request latency, end to end.", a,
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.ttft = Histogram("adapterctl_time_to_first_token_seconds", "Time from request to its first token.", a,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.tpot = Histogram("adapterctl_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", a,
                              buckets=TPOT_BUCKETS, registry=reg)
        alias_labels = ["adapter", "alias", "version", "role"]
        self.alias_requests = Counter(
            "adapterctl_alias_requests",
            "Generate requests for an alias (NAME:ALIAS), by the version that served "
            "them, its role in the alias (primary / canary) and gRPC status code.",
            [*alias_labels, "code"],
            registry=reg,
        )
        self.alias_latency = Histogram("adapterctl_alias_request_duration_seconds",
                                       "Latency of requests for an alias, by serving version.", alias_labels,
                                       buckets=LATENCY_BUCKETS, registry=reg)
        self.alias_ttft = Histogram("adapterctl_alias_time_to_first_token_seconds",
                                    "Time to first token of requests for an alias, by serving version.", alias_labels,
                                    buckets=TTFT_BUCKETS, registry=reg)
        self._alias_versions = AliasVersions()
        self.cache_hits = Counter(
            "adapterctl_adapter_cache_hits", "Adapter cache hits by tier.", ["tier"], registry=reg
        )
        self.cache_misses = Counter("adapterctl_adapter_cache_misses", "Adapter cache misses by tier.", ["tier"],
                                    registry=reg)
        self.evictions = Counter("adapterctl_adapter_evictions", "Adapters evicted, by tier.", ["tier"], registry=reg)
        self.loads = Counter("adapterctl_adapter_loads", "Adapter loads, by source tier.", ["source"], registry=reg)
        self.load_seconds = Histogram("adapterctl_adapter_load_duration_seconds", "Adapter load latency by source.",
                                      ["source"], buckets=LOAD_BUCKETS, registry=reg)
        self.resident = Gauge("adapterctl_adapters_resident", "Adapters resident, by tier.", ["tier"], registry=reg)
        self.resident_bytes = Gauge("adapterctl_adapter_resident_bytes", "Bytes of resident adapters, by tier.",
                                    ["tier"], registry=reg)
        self.pinned = Gauge("adapterctl_adapters_pinned", "Adapters pinned, by tier.", ["tier"], registry=reg)
        self.device_pages = Gauge("adapterctl_device_lora_pages", "Pages of the device LoRA memory (--lora-page-rank "
                                  "rank rows each): held by resident adapters (used) and in all (total).", ["state"],
                                  registry=reg)
        self.running = Gauge("adapterctl_engine_running_requests", "Requests in the running batch.", registry=reg)
        self.waiting = Gauge("adapterctl_engine_waiting_requests", "Requests waiting for a batch slot.", registry=reg)
        self.batch_size = Histogram("adapterctl_engine_batch_size", "Sequences per engine step.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=reg)
        self.batch_tokens = Histogram("adapterctl_engine_batch_tokens", "Tokens processed per engine step.",
                                      buckets=BATCH_TOKEN_BUCKETS, registry=reg)
        self.kv_usage = Gauge("adapterctl_engine_kv_cache_usage_ratio", "Fraction of KV-cache memory in use (0..1).",
                              registry=reg)
        self.rejections = Counter("adapterctl_engine_queue_rejections", "Requests refused because the queue was full.",
                                  registry=reg)
        self.prefix_tokens = Counter("adapterctl_prefix_cache_tokens", "Prompt tokens at admission: K/V restored from "
                                     "the prefix cache (hit) or prefilled (miss).", ["result"], registry=reg)
        self.prefix_bytes = Gauge("adapterctl_prefix_cache_bytes", "Bytes of K/V held by the prefix cache.",
                                  registry=reg)
        self.auth_failures = Counter("adapterctl_auth_failures", "RPCs refused by authentication/authorisation.",
                                     ["code"], registry=reg)
        self.base_model = Info("adapterctl_base_model", "The base model this server serves.", registry=reg)
        for tier in TIERS:  # export zeros so dashboards and rules see every tier from the start
            for family in (self.cache_hits, self.cache_misses, self.evictions):
                family.labels(tier=tier)
        for result in ("hit", "miss"):
            self.prefix_tokens.labels(result=result)
        for code in AUTH_CODES:  # likewise: refused RPCs read 0, not "no data", until the first one
            self.auth_failures.labels(code=code)
        self._http: Any = None

    # ---- requests (servicer) ----------------------------------------------------------
    def observe_request(self, adapter: str | None, code: str, prompt_tokens: int, completion_tokens: int,
                        latency: float, ttft: float | None, api: str = "grpc") -> None:
        """One finished generation through ``api`` (grpc | http); ``code`` is a grpc.StatusCode name."""
        label = self.labels.label(adapter, claim=code == "OK")
        self.requests.labels(adapter=label, code=code, api=api).inc()
        self.latency.labels(adapter=label).observe(latency)
        if prompt_tokens:
            self.prompt_tokens.labels(adapter=label).inc(prompt_tokens)
        if completion_tokens:
            self.generated_tokens.labels(adapter=label).inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(adapter=label).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(adapter=label).observe(max(0.0, latency - ttft) / (completion_tokens - 1))

    def observe_alias_request(self, adapter: str, alias: str, version: int, role: str, code: str,
                              latency: float, ttft: float | None) -> None:
        """One finished request for ``adapter:alias`` that ``adapter:version`` served
        (``role`` primary / canary, "" unknown)."""
        label, role = self.labels.label(adapter, claim=code == "OK"), role or "primary"
        alias, gone = self._alias_versions.admit(label, alias, str(version), role, code)
        for ad, al, ver, r, c in gone:
            self.alias_requests.remove(ad, al, ver, r, c)
            for family in (self.alias_latency, self.alias_ttft):
                with contextlib.suppress(KeyError):  # removed with another code already, or never observed
                    family.remove(ad, al, ver, r)
        labels = {"adapter": label, "alias": alias, "version": str(version), "role": role}
        self.alias_requests.labels(**labels, code=code).inc()
        self.alias_latency.labels(**labels).observe(latency)
        if ttft is not None:
            self.alias_ttft.labels(**labels).observe(ttft)

    def set_base_model(self, model_id: str, fingerprint: str, device: str, dtype: str, engine: str) -> None:
        self.base_model.info({"id": model_id, "fingerprint": fingerprint, "device": device, "dtype": dtype,
                              "engine": engine})

    # ---- EngineObserver ---------------------------------------------------------------
    def on_step(self, batch_size: int, batch_tokens: int, running: int, waiting: int, kv_used: float) -> None:
        if batch_size > 0:  # an empty step only reports the gauges
            self.batch_size.observe(batch_size)
            self.batch_tokens.observe(batch_tokens)
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_used)

    def on_cache(self, tier: str, event: str, adapter: str) -> None:
        family = {"hit": self.cache_hits, "miss": self.cache_misses, "evict": self.evictions}.get(event)
        if family is not None:
            family.labels(tier=tier).inc()

    def on_load(self, source: str, seconds: float, adapter: str) -> None:
        self.loads.labels(source=source).inc()
        self.load_seconds.labels(source=source).observe(seconds)

    def on_residency(self, tier: str, adapters: int, nbytes: int, pinned: int) -> None:
        self.resident.labels(tier=tier).set(adapters)
        self.resident_bytes.labels(tier=tier).set(nbytes)
        self.pinned.labels(tier=tier).set(pinned)

    def on_device_pages(self, used: int, total: int) -> None:
        self.device_pages.labels(state="used").set(used)
        self.device_pages.labels(state="total").set(total)

    def on_queue_rejected(self) -> None:
        self.rejections.inc()

    def on_prefix_cache(self, restored: int, prompt_tokens: int, nbytes: int) -> None:
        self.prefix_tokens.labels(result="hit").inc(restored)
        self.prefix_tokens.labels(result="miss").inc(prompt_tokens - restored)
        self.prefix_bytes.set(nbytes)

    # ---- exposition -------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> int:
        """Start ``/metrics`` on ``host:port`` (0 = any free port); return the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

