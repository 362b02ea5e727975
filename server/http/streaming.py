"""Several generations as one event stream, and the SSE body of a streamed response
(``data: {json}`` events, ending with ``data: [DONE]``).

Closing a merged stream (the client went away: sse-starlette cancels the body) closes
every generation under it, which cancels their engine requests and frees their rows.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Callable

_END = object()


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """``(stream index, item)`` in arrival order; the first error ends it (the rest are cancelled)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[Any]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    queue.put_nowait((i, item))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, _END))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def peek(stream: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """The first item (errors before it raise here, so they get a real HTTP status) and a
    stream that yields it again, then the rest."""
    first = await stream.__anext__()

    async def again() -> AsyncIterator[Any]:
        async with contextlib.aclosing(stream):
            yield first
            async for item in stream:
                yield item

    return first, again()


async def sse(chunks: AsyncIterator[dict[str, Any]], on_error: Callable[[BaseException], dict[str, Any]]
              ) -> AsyncIterator[dict[str, str]]:
    """sse-starlette events: one ``data`` event per chunk, an error object if the stream
    fails after it started (the HTTP status is sent by then), then ``[DONE]``."""
    try:
        async with contextlib.aclosing(chunks) as items:
            async for chunk in items:
                yield {"data": json.dumps(chunk, separators=(",", ":"))}
    except Exception as exc:
        yield {"data": json.dumps(on_error(exc))}
    yield {"data": "[DONE]"}
