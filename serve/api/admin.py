"""Admin API (bearer LORAFLEET_ADMIN_KEY): tenants (keys, limits, disabling, deletion), the
InferenceObjective of their deployments, the audit trail of these operations, and engine
status."""

from __future__ import annotations

import time
from dataclasses import asdict
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import ApiKey, Tenant, TenantPolicy, ValidationSet
from lorafleet.adapters.names import Name
from lorafleet.adapters.registry import digest_in_use, get_deployment, list_deployments
from lorafleet.adapters.tenants import (
    create_tenant,
    delete_tenant,
    get_tenant,
    list_audit,
    list_keys,
    new_key,
    record_audit,
    revoke_key,
    rotate_key,
    set_disabled,
    set_limits,
    stored_usage,
)
from lorafleet.serve.api.dependencies import (
    Actor,
    AdminKey,
    Gateway,
    GatewayDep,
    SessionDep,
    release_connection,
)
from lorafleet.serve.batches.records import digest_held
from lorafleet.serve.limits import Limits
from lorafleet.serve.settings import ObjectiveName
from lorafleet.serve.types import UtcDateTime

__all__ = [
    "router",
    "TenantCreate",
    "TenantCreated",
    "TenantLimitsPut",
    "TenantLimitsPublic",
    "ApiKeyCreate",
    "ApiKeyPublic",
    "ApiKeyCreated",
    "ApiKeyRotate",
    "KeyRotated",
    "TenantDisable",
    "TenantPublic",
    "TenantDeletedPublic",
    "AuditEventPublic",
    "ObjectivePut",
    "ObjectivePublic",
]


NonNegative = Annotated[int, Field(ge=0, le=2**62)]


class TenantCreate(BaseModel):
    name: Name


class TenantCreated(BaseModel):
    name: str
    api_key: str  # shown once; only its hash is stored
    key_id: int | None = None


class TenantLimitsPut(BaseModel):
    """Limits to set for one tenant (0: unlimited) or, given as null, to return to the default."""

    model_config = ConfigDict(extra="forbid")
    rpm: NonNegative | None = None
    tpm: NonNegative | None = None
    concurrency: NonNegative | None = None
    images_per_request: NonNegative | None = None
    image_bytes: NonNegative | None = None
    image_pixels: NonNegative | None = None
    adapters: NonNegative | None = None
    adapter_bytes: NonNegative | None = None
    files: NonNegative | None = None
    batches: NonNegative | None = None
    batch_lines: NonNegative | None = None


class TenantLimitsPublic(BaseModel):
    tenant: str
    limits: dict[str, int]  # in effect
    overrides: dict[str, int]  # set for this tenant; the rest are the defaults
    defaults: dict[str, int]


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Annotated[str, Field(max_length=64)] = ""
    expires_in_s: Annotated[float, Field(gt=0, le=10 * 366 * 86400)] | None = None


class ApiKeyPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    prefix: str
    label: str
    created_at: UtcDateTime
    expires_at: UtcDateTime | None
    revoked_at: UtcDateTime | None
    last_used_at: UtcDateTime | None
    live: bool


class ApiKeyCreated(ApiKeyPublic):
    api_key: str  # shown once


class ApiKeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_s: Annotated[float, Field(ge=0, le=366 * 86400)] = 3600.0


class KeyRotated(BaseModel):
    old: ApiKeyPublic
    new: ApiKeyCreated


class TenantDisable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Annotated[str, Field(max_length=500)] = ""


class TenantPublic(BaseModel):
    name: str
    created_at: UtcDateTime
    disabled: bool
    disabled_reason: str
    keys: int  # live keys
    adapters: int  # versions stored
    adapter_bytes: int
    deployments: int
    limits: dict[str, int]


class TenantDeletedPublic(BaseModel):
    name: str
    deleted: dict[str, int]  # rows per table
    blobs_deleted: int


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    at: UtcDateTime
    actor: str
    action: str
    tenant: str
    details: dict[str, Any]


router = APIRouter(prefix="/admin", dependencies=[AdminKey])


@router.post("/tenants", status_code=201)
def post_tenant(body: TenantCreate, session: SessionDep, actor: Actor) -> TenantCreated:
    tenant, api_key = create_tenant(session, body.name)
    key = list_keys(session, tenant)[0]
    record_audit(session, actor, "tenant.create", tenant.name, key_id=key.id)
    return TenantCreated(name=tenant.name, api_key=api_key, key_id=key.id)


@router.get("/tenants")
def get_tenants(session: SessionDep) -> list[str]:
    return list(session.scalars(select(Tenant.name).order_by(Tenant.name)))


def _limits(gateway: Gateway, overrides: dict | None) -> dict[str, int]:
    return asdict(Limits.defaults(gateway.settings).overridden(overrides))


@router.get("/tenants/{name}")
def get_one_tenant(name: str, gateway: GatewayDep, session: SessionDep) -> TenantPublic:
    tenant = get_tenant(session, name)
    policy = session.get(TenantPolicy, tenant.id)
    stored, size = stored_usage(session, tenant)
    now = time.time()
    return TenantPublic(
        name=tenant.name,
        created_at=tenant.created_at,
        disabled=bool(policy and policy.disabled_at),
        disabled_reason=policy.disabled_reason if policy else "",
        keys=sum(_live(k, now) for k in list_keys(session, tenant)),
        adapters=stored,
        adapter_bytes=size,
        deployments=len(list_deployments(session, tenant)),
        limits=_limits(gateway, policy.limits if policy else None),
    )


@router.get("/tenants/{name}/limits")
def get_limits(name: str, gateway: GatewayDep, session: SessionDep) -> TenantLimitsPublic:
    tenant = get_tenant(session, name)
    policy = session.get(TenantPolicy, tenant.id)
    return _limits_public(gateway, tenant, policy.limits if policy else {})


def _limits_public(gateway: Gateway, tenant: Tenant, overrides: dict) -> TenantLimitsPublic:
    return TenantLimitsPublic(
        tenant=tenant.name,
        limits=_limits(gateway, overrides),
        overrides=overrides,
        defaults=_limits(gateway, None),
    )


@router.put("/tenants/{name}/limits")
def put_limits(
    name: str, body: TenantLimitsPut, gateway: GatewayDep, session: SessionDep, actor: Actor
) -> TenantLimitsPublic:
    """Set some limits (0: unlimited), or return them to the default with null; the others are
    unchanged."""
    tenant = get_tenant(session, name)
    changes = body.model_dump(exclude_unset=True)
    policy = set_limits(session, tenant, changes)
    record_audit(session, actor, "tenant.limits", tenant.name, changes=changes)
    return _limits_public(gateway, tenant, policy.limits)


class ObjectivePut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # an InferenceObjective in the pool's namespace; null: the gateway's default
    objective: ObjectiveName | None


class ObjectivePublic(BaseModel):
    tenant: str
    deployment: str
    objective: str | None  # the deployment's own; None: the default
    default: str  # LORAFLEET_POOL_OBJECTIVE ("": no objective header)


def _objective_public(
    gateway: Gateway, tenant: Tenant, name: str, objective: str | None
) -> ObjectivePublic:
    return ObjectivePublic(
        tenant=tenant.name,
        deployment=name,
        objective=objective,
        default=gateway.settings.pool_objective,
    )


@router.get("/tenants/{name}/deployments/{deployment}/objective")
def get_objective(
    name: str, deployment: str, gateway: GatewayDep, session: SessionDep
) -> ObjectivePublic:
    """The InferenceObjective the deployment's requests name to an InferencePool."""
    tenant = get_tenant(session, name)
    target = get_deployment(session, tenant, deployment)
    return _objective_public(gateway, tenant, target.name, target.objective)


@router.put("/tenants/{name}/deployments/{deployment}/objective")
def put_objective(
    name: str,
    deployment: str,
    body: ObjectivePut,
    gateway: GatewayDep,
    session: SessionDep,
    actor: Actor,
) -> ObjectivePublic:
    """Name the InferenceObjective (its priority in the pool) of the deployment's live requests,
    or return it to the default with null. An admin's: a tenant could otherwise raise its own
    requests over everyone's."""
    tenant = get_tenant(session, name)
    target = get_deployment(session, tenant, deployment)
    target.objective = body.objective
    record_audit(
        session,
        actor,
        "deployment.objective",
        tenant.name,
        deployment=target.name,
        objective=body.objective,
    )
    return _objective_public(gateway, tenant, target.name, target.objective)


def _live(key: ApiKey, now: float) -> bool:
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


def _key_public(key: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic.model_validate({**key.__dict__, "live": _live(key, time.time())})


@router.get("/tenants/{name}/keys")
def get_keys(name: str, session: SessionDep) -> list[ApiKeyPublic]:
    return [_key_public(k) for k in list_keys(session, get_tenant(session, name))]


@router.post("/tenants/{name}/keys", status_code=201)
def post_key(name: str, body: ApiKeyCreate, session: SessionDep, actor: Actor) -> ApiKeyCreated:
    """Another key for the tenant (shown once), optionally expiring."""
    tenant = get_tenant(session, name)
    expires = time.time() + body.expires_in_s if body.expires_in_s else None
    key, secret = new_key(session, tenant, body.label, expires)
    record_audit(session, actor, "key.create", tenant.name, key_id=key.id, expires_at=expires)
    return ApiKeyCreated(**_key_public(key).model_dump(), api_key=secret)


@router.delete("/tenants/{name}/keys/{key_id}")
def delete_key(name: str, key_id: int, session: SessionDep, actor: Actor) -> ApiKeyPublic:
    """Revoke a key: it stops authenticating at once (on other gateways within
    LORAFLEET_CATALOG_CACHE_S)."""
    tenant = get_tenant(session, name)
    key = revoke_key(session, tenant, key_id)
    record_audit(session, actor, "key.revoke", tenant.name, key_id=key.id)
    return _key_public(key)


@router.post("/tenants/{name}/keys/{key_id}/rotate", status_code=201)
def post_rotate(
    name: str, key_id: int, body: ApiKeyRotate, session: SessionDep, actor: Actor
) -> KeyRotated:
    """A new key; the old one keeps working for `grace_s` seconds, then expires."""
    tenant = get_tenant(session, name)
    old, key, secret = rotate_key(session, tenant, key_id, body.grace_s)
    record_audit(
        session,
        actor,
        "key.rotate",
        tenant.name,
        key_id=old.id,
        new_key_id=key.id,
        grace_s=body.grace_s,
    )
    return KeyRotated(
        old=_key_public(old), new=ApiKeyCreated(**_key_public(key).model_dump(), api_key=secret)
    )


@router.post("/tenants/{name}/disable")
def post_disable(
    name: str, body: TenantDisable, gateway: GatewayDep, session: SessionDep, actor: Actor
) -> TenantPublic:
    """Every key of the tenant answers 401 with the reason, until it is enabled again; nothing is
    deleted."""
    tenant = get_tenant(session, name)
    set_disabled(session, tenant, True, body.reason)
    record_audit(session, actor, "tenant.disable", tenant.name, reason=body.reason)
    return get_one_tenant(name, gateway, session)


@router.post("/tenants/{name}/enable")
def post_enable(name: str, gateway: GatewayDep, session: SessionDep, actor: Actor) -> TenantPublic:
    tenant = get_tenant(session, name)
    set_disabled(session, tenant, False)
    record_audit(session, actor, "tenant.enable", tenant.name)
    return get_one_tenant(name, gateway, session)


@router.delete("/tenants/{name}")
async def delete_one_tenant(
    name: str, gateway: GatewayDep, session: SessionDep, actor: Actor, force: bool = False
) -> TenantDeletedPublic:
    """Delete the tenant with its adapters, deployments, validation sets, samples, files,
    batches, usage and budgets, and the stored blobs no one else holds; refused (409) while one
    of its rollouts or A/B tests runs, unless `force=true`."""
    started = time.time()
    tenant = await run_in_threadpool(get_tenant, session, name)
    await run_in_threadpool(gateway.drift.forget, tenant.id)  # the samples waiting in memory too
    deleted = await run_in_threadpool(delete_tenant, session, tenant, force)
    blobs = 0
    for digest in sorted(deleted.adapter_digests):
        if not await run_in_threadpool(digest_in_use, session, digest):
            release_connection(session)
            await gateway.fleet.unload(digest)
            # the last look with the blob out of sight (an object store's calls block: a worker
            # thread)
            blobs += await run_in_threadpool(
                gateway.store.delete, digest, partial(digest_in_use, session, digest)
            )
    for digest in sorted(deleted.validation_digests):
        # a validation upload puts its blob (or renews its time) before its row commits: kept if put
        # since
        blobs += await run_in_threadpool(
            gateway.validation_store.delete,
            digest,
            partial(_validation_in_use, session, digest),
            started,
        )
    for digest in sorted(deleted.file_digests):  # unless another tenant's file holds the bytes
        blobs += await run_in_threadpool(
            gateway.file_store.delete, digest, partial(digest_held, session, digest)
        )
    await run_in_threadpool(
        record_audit,
        session,
        actor,
        "tenant.delete",
        name,
        force=force,
        rows=deleted.counts,
        blobs=blobs,
    )
    return TenantDeletedPublic(name=name, deleted=deleted.counts, blobs_deleted=blobs)


def _validation_in_use(session: Session, digest: str) -> bool:
    return (
        session.scalar(select(ValidationSet.id).where(ValidationSet.digest == digest).limit(1))
        is not None
    )


@router.get("/audit")
def get_audit(
    session: SessionDep,
    tenant: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
) -> list[AuditEventPublic]:
    """Admin operations, newest first; `before` (an event id) pages back."""
    return [AuditEventPublic.model_validate(e) for e in list_audit(session, tenant, limit, before)]


@router.get("/engine")
def get_engine(gateway: GatewayDep) -> dict:
    """The engine (in a fleet: the first replica's supervision, and how many replicas are up)."""
    supervisor = gateway.fleet.replicas[0].supervisor if gateway.fleet.replicas else None
    first = (
        {}
        if supervisor is None
        else {
            "pid": supervisor.process.pid if supervisor.process else None,
            "starts": supervisor.starts,
            "last_start_s": supervisor.last_start_s,
            "last_warm_up_s": supervisor.last_warm_up_s,
            "quantization": supervisor.quantization.label,
            "hardware": supervisor.hardware.describe(),
            "sizing": supervisor.sizing.as_dict(),
        }
    )
    return {
        "up": gateway.fleet.up,
        "base": gateway.settings.base,
        **first,
        **gateway.fleet.status(),
        "admission": {
            "slots": gateway.fair_queue.slots(),
            "in_engine": gateway.fair_queue.in_engine,
            "waiting": gateway.fair_queue.waiting,
        },
    }


@router.get("/engines")
def get_engines(gateway: GatewayDep) -> dict:
    """Every replica: address, state, queue (running, waiting), adapters registered on it,
    hardware."""
    fleet = gateway.fleet
    return {
        "policy": "pool" if fleet.pool else fleet.policy.name,  # the pool: its own placement
        "replicas": fleet.describe(),
        "placed": fleet.placed,
        "spills": fleet.spills,
        "failovers": fleet.failovers,
    }
