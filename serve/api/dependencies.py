"""Request-scoped dependencies, declared once as named aliases; routes never re-do auth."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Tenant
from lorafleet.adapters.errors import Unauthorized
from lorafleet.adapters.registry import authenticate
from lorafleet.serve.gateway import Gateway

__all__ = ["Gateway", "GatewayDep", "SessionDep", "BearerKey", "CurrentTenant", "AdminKey", "bearer_token"]


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


def _session(gateway: GatewayDep) -> Iterator[Session]:
    with gateway.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]


def bearer_token(authorization: str | None) -> str | None:
    """The key in an `Authorization: Bearer <key>` header."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


async def _bearer(authorization: Annotated[str | None, Header()] = None) -> str | None:
    return bearer_token(authorization)


BearerKey = Annotated[str | None, Depends(_bearer)]


def _current_tenant(session: SessionDep, key: BearerKey) -> Tenant:
    return authenticate(session, key)


CurrentTenant = Annotated[Tenant, Depends(_current_tenant)]


def _admin(gateway: GatewayDep, key: BearerKey) -> None:
    expected = gateway.settings.admin_key
    if expected is None:
        raise Unauthorized("the admin API is disabled: LORAFLEET_ADMIN_KEY is not set")
    if not key or not secrets.compare_digest(key, expected.get_secret_value()):
        raise Unauthorized("invalid admin key")


AdminKey = Depends(_admin)
