"""What a tenant's key may call: `/v1/models` (its deployments, in OpenAI's shape; never the
engine's list of every adapter) and `/v1/tenant` (whose key this is)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from lorafleet.adapters.registry import get_deployment, list_deployments
from lorafleet.serve.api.dependencies import ActingAs, CurrentTenant, SessionDep

__all__ = ["router", "ModelPublic", "ModelList", "TenantSelf"]

router = APIRouter(prefix="/v1")


class ModelPublic(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


class TenantSelf(BaseModel):
    """`GET /v1/tenant`: the tenant a key belongs to, and who acts ("tenant:NAME", or the admin
    acting for it)."""

    name: str
    acting_as: str


def _model(name: str, created: float, owner: str) -> ModelPublic:
    return ModelPublic(id=name, created=int(created), owned_by=owner)


@router.get("/models")
def get_models(session: SessionDep, tenant: CurrentTenant) -> ModelList:
    """The tenant's deployments, in OpenAI's shape (never the engine's list of every adapter)."""
    return ModelList(
        data=[
            _model(d.name, d.updated_at.timestamp(), tenant.name)
            for d in list_deployments(session, tenant)
        ]
    )


@router.get("/tenant")
def get_tenant(tenant: CurrentTenant, actor: ActingAs) -> TenantSelf:
    """Whose key this is: the tenant's name (the console's sign-in asks this), and who acts for
    it."""
    return TenantSelf(name=tenant.name, acting_as=actor)


@router.get("/models/{model}")
def get_model(model: str, session: SessionDep, tenant: CurrentTenant) -> ModelPublic:
    deployment = get_deployment(session, tenant, model)
    return _model(deployment.name, deployment.updated_at.timestamp(), tenant.name)
