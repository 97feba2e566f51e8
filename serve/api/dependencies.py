"""Request-scoped dependencies, declared once as named aliases; routes never re-do auth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Tenant
from lorafleet.errors import Unauthorized
from lorafleet.serve.gateway import Gateway

__all__ = [
    "Gateway",
    "GatewayDep",
    "SessionDep",
    "CurrentTenant",
    "AdminKey",
    "Actor",
    "ActingAs",
    "release_connection",
]


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]


def _session(gateway: GatewayDep) -> Iterator[Session]:
    with gateway.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]


def _current_tenant(request: Request, session: SessionDep) -> Tenant:
    """The tenant the `Authenticate` middleware found for this request's key, read in this
    request's session."""
    entry = getattr(request.state, "tenant", None)
    tenant = session.get(Tenant, entry.id) if entry is not None else None
    if tenant is None:  # deleted since its key was checked
        raise Unauthorized("invalid API key")
    release_connection(session)  # the route may await long work (an upload, the engine) next
    return tenant


CurrentTenant = Annotated[Tenant, Depends(_current_tenant)]


def _admin(request: Request) -> str:
    """The admin actor the `Authenticate` middleware let through (it refuses every other key)."""
    actor = getattr(request.state, "actor", None)
    if actor is None:
        raise Unauthorized("invalid admin key")
    return actor


def _acting(request: Request, tenant: CurrentTenant) -> str:
    """Who does what the request asks, as decisions and audit rows name them: the tenant, or the
    admin acting for it (the `Authenticate` middleware set `request.state.actor`)."""
    return getattr(request.state, "actor", None) or f"tenant:{tenant.name}"


ActingAs = Annotated[str, Depends(_acting)]

AdminKey = Depends(_admin)
Actor = Annotated[str, Depends(_admin)]


def release_connection(session: Session) -> None:
    """End the session's read transaction, so its connection goes back to the pool while the
    request waits on something else (an upload, the engine); the rows it loaded stay usable
    (expire_on_commit is off)."""
    if not session.new and not session.dirty and not session.deleted:
        session.commit()
