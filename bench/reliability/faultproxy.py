"""An HTTP/1.1 fault proxy on loopback (asyncio, one request at a time per connection)
in front of the S3 endpoint: ``pass``, ``down`` (connections reset), ``delay`` (each
response held ``delay`` seconds) and ``flaky`` (a seeded fraction of requests answered
503 SlowDown). Changing the mode drops open connections so pooled clients see it at once."""
from __future__ import annotations

import asyncio
import random
import threading

SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s")
SLOWDOWN_BODY = b"<?xml version=\"1.0\"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>"


class FaultProxy:
    """``FaultProxy(upstream_port)``; ``endpoint`` is its URL; ``set_mode`` from any thread."""

    def __init__(self, upstream_port: int, seed: int = 0) -> None:
        self.upstream_port = upstream_port
        self.mode, self.delay, self.error_rate = "pass", 0.0, 0.0
        self.requests = self.injected = 0
        self._rng = random.Random(seed)
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str, delay: float = 0.0, error_rate: float = 0.0) -> None:
        assert mode in ("pass", "down", "delay", "flaky"), mode

        def apply() -> None:
            self.mode, self.delay, self.error_rate = mode, delay, error_rate
            for w in list(self._writers):
                w.transport.abort()

        self._loop.call_soon_threadsafe(apply)
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self._loop).result(10)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        up_writer = None
        try:
            if self.mode == "down":
                writer.transport.abort()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(up_writer)
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method = head.split(b" ", 1)[0].upper()
                if (_header(head, b"expect") or b"").lower() == b"100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # answered here; upstream never sees it
                    head = b"\r\n".join(h for h in head.split(b"\r\n") if not h.lower().startswith(b"expect:"))
                body = await reader.readexactly(_content_length(head))
                self.requests += 1
                if self.mode == "flaky" and self._rng.random() < self.error_rate:
                    self.injected += 1
                    writer.write(SLOWDOWN % (len(SLOWDOWN_BODY), SLOWDOWN_BODY))
                    await writer.drain()
                    return
                up_writer.write(head + body)
                await up_writer.drain()
                response = await _read_response(up_reader, method == b"HEAD")
                if self.mode == "delay":
                    await asyncio.sleep(self.delay)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _content_length(head: bytes) -> int:
    value = _header(head, b"content-length")
    return int(value) if value else 0


async def _read_response(reader: asyncio.StreamReader, head_only: bool) -> bytes:
    """One whole HTTP response (Content-Length or chunked body) as bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    while 100 <= status < 200:  # interim responses: skip to the final one
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
    if head_only or status in (204, 304):
        return head
    if (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        parts = [head]
        while True:
            size_line = await reader.readuntil(b"\r\n")
            parts.append(size_line)
            size = int(size_line.split(b";")[0], 16)
            parts.append(await reader.readexactly(size + 2))
            if size == 0:
                return b"".join(parts)
    return head + await reader.readexactly(_content_length(head))
