"""A handler error after the client went away (cancelled, or its deadline passed) is not an
internal error: no abort is attempted (it would fail: "Abort already called") and nothing is
logged as unexpected; the call ends as cancelled (found by the reliability fuzzer)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from adapterctl.errors import InvalidArgument
from adapterctl.server.interceptors import ErrorInterceptor


class _Context:
    def __init__(self, cancelled: bool, remaining: float | None) -> None:
        self._cancelled, self._remaining, self.aborted = cancelled, remaining, []

    def cancelled(self) -> bool:
        return self._cancelled

    def time_remaining(self) -> float | None:
        return self._remaining

    async def abort(self, code, details):
        self.aborted.append(code)
        raise RuntimeError("abort")


class _Handler:
    def __init__(self, unary_unary) -> None:
        self.unary_unary, self.unary_stream, self.request_deserializer = unary_unary, None, None

    def _replace(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)
        return self


@pytest.mark.parametrize("cancelled,remaining,gone", [(True, 5.0, True), (False, -0.1, True), (False, None, False),
                                                      (False, 3.0, False)])
def test_error_after_the_client_left_is_not_internal(caplog, cancelled, remaining, gone):
    async def behavior(request, context):
        raise InvalidArgument("bad")

    async def continuation(details):
        return _Handler(behavior)

    async def run():
        handler = await ErrorInterceptor().intercept_service(continuation, type("D", (), {"method": "/m"})())
        ctx = _Context(cancelled, remaining)
        with pytest.raises(asyncio.CancelledError if gone else RuntimeError):
            await handler.unary_unary(object(), ctx)
        return ctx

    caplog.set_level(logging.DEBUG, logger="adapterctl.server.interceptors")
    ctx = asyncio.run(run())
    assert ctx.aborted == ([] if gone else [__import__("grpc").StatusCode.INVALID_ARGUMENT])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
