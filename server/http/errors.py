"""Errors on the HTTP API: OpenAI's JSON error shape, with the HTTP status taken from the
one domain-error -> gRPC status mapping (:mod:`adapterctl.server.interceptors`)."""
from __future__ import annotations

import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapterctl.errors import AdapterctlError
from adapterctl.server.interceptors import http_status, status_code

log = logging.getLogger(__name__)


class APIError(Exception):
    """A refusal decided by the HTTP layer itself (auth, serving gate), as a gRPC code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def error_body(code: grpc.StatusCode, message: str, param: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, ``{"error": {message, type, param, code}}``) for a gRPC code."""
    status, kind = http_status(code)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code.name.lower()}}


def exception_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The response for any exception: domain errors keep their message; anything
    unexpected is logged and answered 500 with a generic one."""
    if isinstance(exc, APIError):
        return error_body(exc.code, str(exc))
    code = status_code(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error in an HTTP request", exc_info=exc)
        return error_body(code, f"internal error ({type(exc).__name__}); see the server log")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return error_body(code, "the request deadline passed")
    return error_body(code, str(exc))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid"))), param


def install(app: FastAPI) -> None:
    """Exception handlers: every error leaves as OpenAI's error JSON."""

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        status, body = error_body(grpc.StatusCode.INVALID_ARGUMENT, message, param)
        return JSONResponse(body, status_code=status)

    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        body = {"error": {"message": str(exc.detail), "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        status, body = exception_body(exc)
        headers = {"www-authenticate": "Bearer"} if status == 401 else None
        return JSONResponse(body, status_code=status, headers=headers)

    app.add_exception_handler(RequestValidationError, on_validation)  # type: ignore[arg-type]  # starlette's stub
    app.add_exception_handler(HTTPException, on_http)  # type: ignore[arg-type]
    for kind in (AdapterctlError, APIError, TimeoutError):  # answered here, never re-raised
        app.add_exception_handler(kind, on_error)
    app.add_exception_handler(Exception, on_error)  # 500; Starlette also logs the traceback
