"""Server process lifecycle: bind (health NOT_SERVING) -> load the model -> SERVING ->
on SIGTERM drain (NOT_SERVING, listener closed + GOAWAY, new RPCs UNAVAILABLE, in-flight get
--shutdown-grace) -> exit 0.

:class:`AdapterctlServer` runs on the caller's event loop; :func:`run` is the CLI
entry point; :class:`BackgroundServer` runs one on a thread (tests, notebooks).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import threading
from typing import Any, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterctl.errors import Unavailable
from adapterctl.server.build import build_engine
from adapterctl.server.config import ServerConfig
from adapterctl.server.generation import Generations
from adapterctl.server.interceptors import (
    DRAINING,
    SERVING,
    AccessInterceptor,
    ErrorInterceptor,
    ServingState,
    TokenTable,
)
from adapterctl.server.metrics import ServerMetrics
from adapterctl.server.servicer import AdminServicer, InferenceServicer
from adapterctl.server.types import Engine, EngineObserver
from adapterctl.v1 import adapterctl_pb2 as pb
from adapterctl.v1 import adapterctl_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
EngineFactory = Callable[[ServerConfig, EngineObserver], Engine]


class AdapterctlServer:
    """One gRPC server + metrics endpoint + engine, driven by :meth:`start` / :meth:`stop`."""

    def __init__(self, config: ServerConfig, engine_factory: EngineFactory = build_engine,
                 metrics: ServerMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or ServerMetrics(config.metrics_max_adapters)
        self.state = ServingState()
        self.engine: Engine | None = None
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http: Any = None  # server.http.app.HttpServer when the HTTP API is on (imported lazily)
        self._engine_factory = engine_factory
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopped = asyncio.Event()
        self.listening = asyncio.Event()  # set once bound (health answers NOT_SERVING from then on)

    async def start(self) -> None:
        """Bind and answer health NOT_SERVING at once; return once the model is loaded and SERVING."""
        cfg = self.config
        tokens = TokenTable.from_file(cfg.auth_token_file) if cfg.auth_token_file else None
        access = AccessInterceptor(self.state, tokens, lambda code: self.metrics.auth_failures.labels(code=code).inc())
        self._server = grpc.aio.server(interceptors=[access, ErrorInterceptor()],
                                       options=[("grpc.so_reuseport", 0)])
        # Services are registered before start (grpc needs that); they see the engine once loaded.
        # One shared request path for both front ends; it sees the engine once loaded.
        generations = Generations(None, self.metrics, cfg.default_max_new_tokens, cfg.engine.max_new_tokens_limit,
                                  self.state)
        inference = InferenceServicer(generations)
        admin = AdminServicer(None)
        pb_grpc.add_InferenceServicer_to_server(inference, self._server)
        pb_grpc.add_AdminServicer_to_server(admin, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._bind()
        if cfg.metrics_port >= 0:
            self.metrics_port = self.metrics.serve_http(cfg.metrics_host or cfg.host, cfg.metrics_port)
        await self._server.start()
        if cfg.http_enabled:
            self.http_port = await self._start_http(generations, tokens)
        self.listening.set()
        log.info("listening on %s:%s (tls=%s, auth=%s), metrics on %s, http on %s; loading the model", cfg.host,
                 self.port, cfg.tls, tokens is not None, self.metrics_port, self.http_port)
        self.engine = await asyncio.to_thread(self._engine_factory, cfg, self.metrics)
        await self.engine.start()
        if cfg.chat_template:
            self.engine.tokenizer.chat_template = cfg.chat_template.read_text()
        generations.engine = admin.engine = self.engine
        base, engine = getattr(self.engine, "base", None), self.engine
        self.metrics.set_base_model(getattr(base, "id", cfg.base_model or ""), getattr(base, "fingerprint", ""),
                                    str(getattr(engine, "device", cfg.engine.device or "")),
                                    getattr(engine, "dtype", cfg.engine.dtype),  # "auto" as resolved
                                    type(engine).__name__)
        if cfg.store.alias_refresh > 0:
            self._tasks.append(asyncio.create_task(self._refresh_loop(cfg.store.alias_refresh)))
        self.state.phase = SERVING
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._announce()

    async def _start_http(self, generations: Generations, tokens: TokenTable | None) -> int:
        from adapterctl.server.http.app import HttpServer, create_app
        from adapterctl.server.http.routes import Frontend

        front = Frontend(generations, tokens, lambda code: self.metrics.auth_failures.labels(code=code).inc())
        self._http = HttpServer(create_app(front), self.config.host, self.config.http_port)
        return await self._http.start()

    def _bind(self) -> int:
        cfg, address = self.config, f"{self.config.host}:{self.config.port}"
        try:
            if cfg.tls:
                ca = cfg.tls_client_ca.read_bytes() if cfg.tls_client_ca else None
                creds = grpc.ssl_server_credentials([(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                                                    root_certificates=ca, require_client_auth=ca is not None)
                port = self._server.add_secure_port(address, creds)
            else:
                port = self._server.add_insecure_port(address)
        except RuntimeError as exc:
            raise Unavailable(f"cannot listen on {address}: {exc}") from exc
        if not port:
            raise Unavailable(f"cannot listen on {address}")
        return port

    def _announce(self) -> None:
        info = {"pid": os.getpid(), "host": self.config.host, "port": self.port, "metrics_port": self.metrics_port,
                "http_port": self.http_port}
        if self.config.ready_file:
            tmp = self.config.ready_file.with_name(self.config.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(info))
            os.replace(tmp, self.config.ready_file)
        log.info("serving %s", json.dumps(info))

    async def _set_health(self, status: int) -> None:
        for service in ("", *SERVICES):
            await self._health.set(service, status)

    async def _refresh_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                for name, alias, old, new in await self.engine.refresh_aliases():
                    log.info("hot reload: %s:%s now version %s (was %s)", name, alias, new, old)
            except Exception as exc:  # registry down: keep serving the versions we have
                log.warning("alias refresh failed: %s", exc)

    def request_stop(self) -> None:
        """Signal-safe: ask :meth:`serve_forever` to drain and return."""
        self._stopped.set()

    async def serve_forever(self) -> None:
        await self._stopped.wait()
        await self.stop()

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new RPCs, give in-flight ones ``grace`` seconds, stop the engine."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.state.phase = DRAINING
        # Stop accepting at once: grpc closes the listener and sends GOAWAY on open connections,
        # so a proxy (deploy/nginx) reconnects to another replica instead of passing on UNAVAILABLE.
        closing = asyncio.ensure_future(self._server.stop(grace)) if self._server is not None else None
        await asyncio.sleep(0)  # let it start (listener closed) before health says NOT_SERVING
        await self._health.enter_graceful_shutdown()
        log.info("draining: in-flight requests have %.1fs", grace)
        for task in self._tasks:
            task.cancel()
        if closing is not None:
            try:  # generations get the grace period; grpc's stop(grace) cancels what is left after it
                if self.state.inflight:
                    await asyncio.wait_for(self.state.wait_idle(), grace)
            except asyncio.TimeoutError:
                log.warning("grace period over with %d request(s) in flight; cancelling them", self.state.inflight)
            # One stop call only: a second, overlapping stop(0) crashed grpc's aio server (a segfault
            # in tests/server/grpc/test_grpc_lifecycle.py).
            await closing
        if self._http is not None:
            await self._http.stop()
        if self.engine is not None:
            await self.engine.stop()
        self.metrics.stop_http()
        log.info("stopped")


def run(config: ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain; returns the process exit code."""

    async def main() -> None:
        server = AdapterctlServer(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        try:
            await server.start()
        except BaseException:
            await server.stop(0)
            raise
        print(f"adapterctl serving grpc={config.host}:{server.port} metrics={server.metrics_port} "
              f"http={server.http_port if server.http_port is not None else 'off'}", flush=True)
        await server.serve_forever()

    asyncio.run(main())
    return 0


class BackgroundServer:
    """An :class:`AdapterctlServer` on its own thread and event loop (tests, notebooks)."""

    def __init__(self, config: ServerConfig, engine_factory: EngineFactory = build_engine) -> None:
        self.config = config
        self._factory = engine_factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="adapterctl-server", daemon=True)
        self.server: AdapterctlServer | None = None
        self._starting: Any = None

    def start(self, timeout: float = 120, wait: bool = True) -> "BackgroundServer":
        """Start; return once SERVING, or with ``wait=False`` once bound (still loading)."""
        self._thread.start()
        self.server = self.call(self._create())
        self._starting = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        if wait:
            self.wait_serving(timeout)
        else:
            self.call(self.server.listening.wait(), timeout)
        return self

    def wait_serving(self, timeout: float = 120) -> None:
        self._starting.result(timeout)

    async def _create(self) -> AdapterctlServer:
        return AdapterctlServer(self.config, self._factory)

    async def _start(self) -> None:
        try:
            await self.server.start()
        except BaseException:
            await self.server.stop(0)
            raise

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.server.port}"

    def stop(self, grace: float = 0) -> None:
        with contextlib.suppress(Exception):
            if self.server is not None:
                self.call(self.server.stop(grace), timeout=grace + 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
