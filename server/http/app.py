"""The FastAPI app and :class:`HttpServer`: uvicorn serving it as a task on the caller's
event loop (the gRPC server's), on a socket bound up front so port 0 reports its port.

uvicorn's own signal handling is off: the process's SIGTERM drain (server.app) decides
when HTTP stops, after in-flight requests had their grace period.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn
from fastapi import FastAPI

from adapterctl.errors import Unavailable
from adapterctl.server.http import errors
from adapterctl.server.http.routes import Frontend, router

log = logging.getLogger(__name__)


def create_app(front: Frontend) -> FastAPI:
    """The OpenAI-compatible app over ``front`` (routes, error shape, no docs UI)."""
    # No trailing-slash redirects: `/v1/models/` is an unknown path (404 error JSON), not an empty 307.
    app = FastAPI(title="adapterctl", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.frontend = front
    app.include_router(router)
    errors.install(app)
    return app


class _Server(uvicorn.Server):
    """uvicorn without signal handlers, reporting when it is accepting."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self.ready.set()


class HttpServer:
    """One uvicorn server for ``app`` on ``host:port`` (0 = a free port)."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self.app, self.host, self.requested_port = app, host, port
        self.port = 0
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind, start serving, return the bound port (Unavailable when it cannot bind)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise Unavailable(f"cannot listen on {self.host}:{self.requested_port} (HTTP): {exc}") from exc
        sock.listen(1024)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=1, timeout_keep_alive=30)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="adapterctl-http")
        ready = asyncio.create_task(self._server.ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            self._task.result()  # raises what stopped uvicorn
            raise Unavailable(f"the HTTP server on {self.host}:{self.port} did not start")
        return self.port

    async def stop(self) -> None:
        """Stop accepting, close connections (in-flight requests were drained before)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(Exception):
            await self._task
        self._server = self._task = None
