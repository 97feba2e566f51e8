"""What every request passes before any route sees it: authentication from its headers alone, then a
bound on its body, both as ASGI middleware, so nothing of an unauthenticated or oversized body is
read, parsed or stored.

- `/v1/...` needs a live tenant key (it and the tenant's snapshot are put in `request.state`), or
  the admin key with `X-Lorafleet-Tenant: NAME` to act for that tenant (the console's admin view;
  its actor name in `request.state.actor`, no `api_key`; it does not chat), or the admin key alone
  on the fleet's reads (`/v1/usage`: every tenant's); `/admin/...` the admin
  key (its actor name in `request.state.actor`); `/metrics` the admin or the metrics token (or its
  own listener). A malformed `Authorization` header (another scheme, empty, non-ASCII) is a 401 like
  a wrong key.
- Bodies are bounded by their `Content-Length` and, for chunked bodies, by counting as they arrive.
- The API's bodies are JSON whatever their `Content-Type` says (`JsonBodies`): `curl -d` sends
  form-urlencoded, other clients none; the chat endpoint always read them as JSON, now every route
  does. Uploads (multipart or an archive) keep theirs.
"""

from __future__ import annotations

import hmac
import re

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.errors import InvalidRequest, LorafleetError, Unauthorized
from lorafleet.serve.api.errors import error_response
from lorafleet.serve.gateway import Gateway

__all__ = [
    "Authenticate",
    "BodyLimit",
    "JsonBodies",
    "bearer_from_headers",
    "admin_actor",
    "UPLOAD_PATHS",
    "FILE_PATHS",
    "FLEET_READS",
]

# The routes that answer with the model: a tenant's own key only (its limits, its request log).
CHAT_PATHS = ("/v1/chat/", "/v1/responses")
# The routes the admin key alone reads for the whole fleet (no tenant in `request.state`).
FLEET_READS = ("/v1/usage",)
# The routes whose bodies are uploads (adapter archives, validation sets): bounded by
# max_upload_bytes.
UPLOAD_PATHS = re.compile(r"^/v1/(adapters|deployments/[^/]+/validation)/?$")
# a tenant's file (a batch's requests): bounded by max_file_bytes
FILE_PATHS = re.compile(r"^/v1/files/?$")
_PRINTABLE_ASCII = re.compile(rb"^[\x21-\x7e]+$")


def bearer_from_headers(headers: list[tuple[bytes, bytes]]) -> str:
    """The key of an `Authorization: Bearer <key>` header; Unauthorized for anything else."""
    values = [v for k, v in headers if k == b"authorization"]
    if not values or not values[0].strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = values[0].strip().partition(b" ")
    if scheme.lower() != b"bearer":
        raise Unauthorized("use 'Authorization: Bearer <key>'; other schemes are not accepted")
    token = token.strip()
    if not _PRINTABLE_ASCII.match(token):
        raise Unauthorized(
            "invalid API key" if token else "missing API key: send 'Authorization: Bearer <key>'"
        )
    return token.decode("ascii")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str | None:
    value = next((v for k, v in headers if k == name), None)
    return value.decode("latin-1").strip() if value is not None else None


def admin_actor(scope: Scope) -> str:
    client = scope.get("client")
    return f"admin@{client[0]}" if client else "admin"


def _matches(token: str, secret: str | None) -> bool:
    return secret is not None and hmac.compare_digest(token.encode(), secret.encode())


class Authenticate:
    """401 before the route runs (and before its body is read) unless the request carries the
    right key."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        try:
            if path.startswith("/v1/"):
                key = bearer_from_headers(scope["headers"])
                state = scope.setdefault("state", {})
                acting_for = _header(scope["headers"], b"x-lorafleet-tenant")
                if acting_for is None and path in FLEET_READS and self._is_admin(key):
                    state["actor"] = admin_actor(scope)
                elif acting_for is None:
                    state["tenant"] = await self.gateway.route_cache.tenant(key)
                    state["api_key"] = key
                else:
                    self._admin(key, "X-Lorafleet-Tenant needs the admin key")
                    if path.startswith(CHAT_PATHS):
                        raise InvalidRequest(
                            "the admin key does not chat for a tenant; use one of its keys"
                        )
                    state["tenant"] = await self.gateway.route_cache.tenant_named(acting_for)
                    state["api_key"], state["actor"] = None, admin_actor(scope)
            elif path == "/admin" or path.startswith("/admin/"):
                self._admin(bearer_from_headers(scope["headers"]))
                scope.setdefault("state", {})["actor"] = admin_actor(scope)
            elif path == "/metrics":
                self._metrics(bearer_from_headers(scope["headers"]))
        except LorafleetError as exc:
            response = error_response(
                exc.status,
                exc.message,
                exc.type,
                exc.code,
                {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None,
            )
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _is_admin(self, token: str) -> bool:
        expected = self.gateway.settings.admin_key
        return expected is not None and _matches(token, expected.get_secret_value())

    def _admin(self, token: str, refusal: str = "invalid admin key") -> None:
        if self.gateway.settings.admin_key is None:
            raise Unauthorized("the admin API is disabled: LORAFLEET_ADMIN_KEY is not set")
        if not self._is_admin(token):
            raise Unauthorized(refusal)

    def _metrics(self, token: str) -> None:
        settings = self.gateway.settings
        secrets = [
            s.get_secret_value()
            for s in (settings.admin_key, settings.metrics_token)
            if s is not None
        ]
        if not any(_matches(token, secret) for secret in secrets):
            raise Unauthorized(
                "/metrics needs the metrics token (LORAFLEET_METRICS_TOKEN) or the admin key"
            )


class BodyLimit:
    """413 for a body over its route's limit: from Content-Length before reading, or while a
    chunked body arrives."""

    def __init__(
        self,
        app: ASGIApp,
        max_upload_bytes: int,
        max_request_bytes: int,
        max_file_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_upload_bytes = max_upload_bytes + 1024 * 1024  # + multipart framing
        self.max_request_bytes = max_request_bytes
        self.max_file_bytes = (max_file_bytes or max_request_bytes) + 1024 * 1024

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        limit = (
            self.max_upload_bytes
            if UPLOAD_PATHS.match(path)
            else self.max_file_bytes
            if FILE_PATHS.match(path)
            else self.max_request_bytes
        )
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit():
            response = error_response(
                400, "invalid Content-Length header", "invalid_request_error", "invalid_request"
            )
            return await response(scope, receive, send)
        if int(length) > limit:
            response = error_response(
                413,
                f"request body is larger than the limit of {limit} bytes",
                "invalid_request_error",
                "payload_too_large",
            )
            return await response(scope, receive, send)
        received = 0

        async def bounded_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                # a chunked body (no Content-Length) that keeps coming; an HTTPException, as
                if received > limit:
                    # FastAPI turns any other error while reading a body into a 400
                    raise HTTPException(
                        413, f"request body is larger than the limit of {limit} bytes"
                    )
            return message

        await self.app(scope, bounded_receive, send)


# what clients send a JSON body as without saying so (curl -d: form-urlencoded)
_NOT_SAID_JSON = {b"", b"application/x-www-form-urlencoded", b"text/plain"}


class JsonBodies:
    """An API request's body is read as JSON when its `Content-Type` is missing, form-urlencoded or
    text (the API takes no forms; the console's forms are under /console)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and path.startswith(("/v1/", "/admin/"))
            and not path.startswith(CHAT_PATHS)  # they read their bodies themselves (hot path)
            and not UPLOAD_PATHS.match(path)
        ):
            given = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
            if given.split(b";")[0].strip().lower() in _NOT_SAID_JSON:
                headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
                scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
