"""The one place where every error becomes OpenAI's `{"error": {...}}` shape with its status.

Our errors are `LorafleetError`s (the tree is drawn in `lorafleet.errors`); request validation,
HTTP and stale-write errors are mapped here too, and anything else is a 500 that names no server
internals.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.orm.exc import StaleDataError
from starlette.exceptions import HTTPException

from lorafleet.adapters.catalog import is_transient
from lorafleet.errors import LorafleetError, ServiceUnavailable, code_for_status

__all__ = ["error_response", "install_error_handlers"]

log = logging.getLogger("lorafleet.gateway")


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | int | None,
    headers: dict[str, str] | None = None,
    param: str | None = None,
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        status_code=status,
        headers=headers,
    )


async def _lorafleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LorafleetError)
    headers = dict(exc.headers or {})
    if isinstance(exc, ServiceUnavailable):
        gateway = getattr(request.app.state, "gateway", None)
        headers["Retry-After"] = str(
            gateway.settings.retry_after_s if gateway else exc.retry_after_s
        )
    code = exc.code or ("invalid_request" if exc.status < 500 else "internal_error")
    return error_response(exc.status, exc.message, exc.type, code, headers or None, exc.param)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return error_response(
        400, f"invalid request: {problems}", "invalid_request_error", "invalid_request"
    )


# OpenAI endpoints the gateway does not serve, and what to use instead
_NOT_SERVED = {
    "/v1/completions": "legacy completions are not served; use /v1/chat/completions",
    "/v1/embeddings": "embeddings are not served; lorafleet serves chat completions",
    "/v1/audio": "audio is not served; lorafleet serves chat completions with images",
    "/v1/images": "image generation is not served; lorafleet serves chat completions with images",
    "/v1/moderations": "moderations are not served",
    "/v1/fine_tuning": "OpenAI's fine-tuning API is not served; upload adapters (/v1/adapters)",
    "/v1/assistants": "assistants are not served; use /v1/chat/completions",
    "/v1/threads": "threads are not served; use /v1/chat/completions",
    "/v1/responses": "responses are not stored (POST /v1/responses answers statelessly): there is "
    "nothing to retrieve, cancel or delete",
}


def _not_found_message(request: Request) -> str:
    """What a request for a route that does not exist is told: the route, and what to use."""
    path = request.url.path
    for prefix, hint in _NOT_SERVED.items():
        if path == prefix or path.startswith(prefix + "/"):
            return f"{request.method} {path}: {hint}"
    return f"no route {request.method} {path} (the routes are listed at /docs)"


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # Starlette's own answer for a path no route matches
    not_routed = exc.status_code == 404 and exc.detail == "Not Found"
    return error_response(
        exc.status_code,
        _not_found_message(request) if not_routed else str(exc.detail),
        "invalid_request_error",
        code_for_status(exc.status_code, "invalid_request"),
        dict(exc.headers) if exc.headers else None,
    )


async def _stale_write(_: Request, exc: Exception) -> JSONResponse:
    return error_response(
        409,
        "the rollout changed while this request was applied (the controller or another "
        "user acted); read its status and retry",
        "invalid_request_error",
        "concurrent_update",
    )


async def _out_of_range(_: Request, exc: Exception) -> JSONResponse:
    # e.g. an id past the database's 64-bit integers, in a path or a query
    return error_response(
        400, "a number in the request is out of range", "invalid_request_error", "invalid_request"
    )


async def _unstorable(_: Request, exc: Exception) -> JSONResponse:
    # PostgreSQL refuses what SQLite keeps, e.g. a NUL character in a text field
    return error_response(
        400,
        "a value in the request cannot be stored (a NUL character, or a number out of range)",
        "invalid_request_error",
        "invalid_request",
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    # a deadlock or a lock held too long: the same request succeeds when sent again
    if is_transient(exc):
        gateway = getattr(request.app.state, "gateway", None)
        retry = str(gateway.settings.retry_after_s if gateway else 1)
        return error_response(
            503,
            "the catalog is busy; retry",
            "server_error",
            "catalog_busy",
            {"Retry-After": retry},
        )
    return await _unexpected_error(request, exc)


async def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(
        500, "internal error; see the gateway log", "server_error", "internal_error"
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LorafleetError, _lorafleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(StaleDataError, _stale_write)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(Exception, _unexpected_error)
