"""Admin API (bearer LORAFLEET_ADMIN_KEY): tenants and engine status."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from lorafleet.adapters.catalog import Tenant
from lorafleet.adapters.registry import create_tenant
from lorafleet.adapters.schemas import TenantCreate, TenantCreated
from lorafleet.serve.api.dependencies import AdminKey, GatewayDep, SessionDep

__all__ = ["router"]

router = APIRouter(prefix="/admin", dependencies=[AdminKey])


@router.post("/tenants", status_code=201)
def post_tenant(body: TenantCreate, session: SessionDep) -> TenantCreated:
    tenant, api_key = create_tenant(session, body.name)
    return TenantCreated(name=tenant.name, api_key=api_key)


@router.get("/tenants")
def get_tenants(session: SessionDep) -> list[str]:
    return list(session.scalars(select(Tenant.name).order_by(Tenant.name)))


@router.get("/engine")
def get_engine(gateway: GatewayDep) -> dict:
    supervisor = gateway.supervisor
    return {"up": gateway.engine.up, "pid": supervisor.process.pid if supervisor.process else None,
            "starts": supervisor.starts, "last_start_s": supervisor.last_start_s, "base": gateway.settings.base,
            "quantization": supervisor.quantization.label, "hardware": supervisor.hardware.describe(),
            "sizing": supervisor.sizing.as_dict()}
