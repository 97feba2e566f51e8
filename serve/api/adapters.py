"""Tenant API for adapters and deployments (bearer tenant API key)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Adapter, AdapterVersion, Deployment, Tenant, TenantPolicy
from lorafleet.adapters.manifest import manifest_matches
from lorafleet.adapters.registry import (
    delete_version,
    deployed_workload,
    digest_in_use,
    get_adapter,
    get_deployment,
    list_adapters,
    list_deployments,
    register_version,
    resolve_version,
    set_deployment,
)
from lorafleet.adapters.tenants import stored_usage
from lorafleet.adapters.validate import ValidatedAdapter, validate_upload
from lorafleet.errors import Conflict, QuotaExceeded
from lorafleet.serve.api.dependencies import (
    CurrentTenant,
    Gateway,
    GatewayDep,
    SessionDep,
    release_connection,
)
from lorafleet.serve.engine.sizing import Workload
from lorafleet.serve.feedback.schemas import CapturePolicy, DeploymentTraffic
from lorafleet.serve.feedback.traffic import (
    DEFAULT_WINDOW_S,
    MAX_WINDOW_S,
    MIN_WINDOW_S,
    deployment_traffic,
)
from lorafleet.serve.limits import Limits
from lorafleet.serve.types import UtcDateTime

__all__ = [
    "router",
    "version_public",
    "version_detail",
    "deployment_public",
    "prepare_engine",
    "AdapterVersionPublic",
    "AdapterVersionDetail",
    "AdapterPublic",
    "AdapterDetail",
    "DeploymentPut",
    "ValidationSetPublic",
    "DeploymentPublic",
]


class AdapterVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    name: str
    version: int
    digest: str
    rank: int
    alpha: float
    target_modules: list[str]
    # the parts of the base it changes: "language" (the language model), "connector", "vision"
    # (the vision tower)
    parts: list[str]
    size_bytes: int
    created_at: UtcDateTime


class AdapterVersionDetail(AdapterVersionPublic):
    """A version as `GET /v1/adapters/{name}` shows it: with the trainer's manifest uploaded
    beside it."""

    manifest: dict[str, Any] | None = None  # None: uploaded without one
    # whether the adapter digest the manifest records is `digest`; None: no manifest, or it records
    # none
    manifest_matches: bool | None = None


class AdapterPublic(BaseModel):
    name: str
    versions: list[AdapterVersionPublic]


class AdapterDetail(AdapterPublic):
    versions: list[AdapterVersionDetail]  # type: ignore[assignment]  # each version with its manifest


class DeploymentPut(BaseModel):
    adapter: str  # "NAME" (latest), "NAME@N", or a digest


class ValidationSetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    digest: str
    metric: str
    items: int
    size_bytes: int
    created_at: UtcDateTime


class DeploymentPublic(BaseModel):
    name: str
    adapter: AdapterVersionPublic
    updated_at: UtcDateTime
    previous_adapter: str | None = None  # NAME@N that `undo` goes back to
    answer_format: dict | None = None
    validation_set: ValidationSetPublic | None = None
    rollout_id: int | None = None
    capture: CapturePolicy | None = None  # None: no request of it is kept
    # the InferenceObjective the admin gave it (None: the gateway's default)
    objective: str | None = None


router = APIRouter(prefix="/v1")


def version_public(version: AdapterVersion) -> AdapterVersionPublic:
    return AdapterVersionPublic.model_validate(
        {**version.__dict__, "name": version.adapter.name, "parts": version.touches}
    )


def version_detail(version: AdapterVersion) -> AdapterVersionDetail:
    """The version with its manifest (a deferred column: read here, in the route's session)."""
    return AdapterVersionDetail.model_validate(
        {
            **version_public(version).model_dump(),
            "manifest": version.manifest,
            "manifest_matches": manifest_matches(version.manifest, version.digest),
        }
    )


def _adapter_public(adapter: Adapter) -> AdapterPublic:
    return AdapterPublic(name=adapter.name, versions=[version_public(v) for v in adapter.versions])


def deployment_public(deployment: Deployment) -> DeploymentPublic:
    previous = deployment.previous_stable
    validation = deployment.validation_set
    return DeploymentPublic(
        name=deployment.name,
        adapter=version_public(deployment.stable),
        updated_at=deployment.updated_at,
        answer_format=deployment.answer_format,
        previous_adapter=f"{previous.adapter.name}@{previous.version}" if previous else None,
        validation_set=ValidationSetPublic.model_validate(validation) if validation else None,
        rollout_id=deployment.rollout_id,
        capture=CapturePolicy.model_validate(deployment.capture) if deployment.capture else None,
        objective=deployment.objective,
    )


async def prepare_engine(
    gateway: Gateway, session: Session, versions: Sequence[AdapterVersion]
) -> None:
    """Before a catalog change serves `versions`: an engine whose max LoRA rank is below theirs
    restarts with a larger one (409 when LORAFLEET_MAX_LORA_RANK fixes it); then they are
    registered, or, with the engine down, left to the registration that follows its next start. A
    failure here leaves the catalog as it was."""
    if not gateway.fleet.serves_rank(max((v.rank for v in versions), default=0)):
        workload = Workload(*await run_in_threadpool(deployed_workload, session, versions))
        await gateway.fleet.resize_for(workload)
    release_connection(session)  # never held across the engine's work
    await gateway.fleet.preload([v.digest for v in versions])
    for version in versions:
        await _check_reaches_pictures(gateway, version)


async def _check_reaches_pictures(gateway: Gateway, version: AdapterVersion) -> None:
    """409 when an adapter on the vision tower or connector would be served as the base: its
    engine (one lorafleet does not start, at `LORAFLEET_ENGINE_URL(S)`) runs without vLLM's tower
    and connector LoRA. With the engine down, asked at the first deployment after."""
    if version.touches == ["language"] or not gateway.fleet.up:
        return
    client = gateway.fleet.client_for(version.digest)
    await client.ensure_loaded(version.digest)
    if not await client.reaches_pictures(version.digest):
        raise Conflict(
            f"{version.adapter.name}@{version.version} changes the "
            f"{' and '.join(version.touches)}, but its engine answers pictures through it exactly "
            "as through the base: the engine runs without vLLM's tower and connector LoRA "
            "(start it with --enable-tower-connector-lora)",
            code="tower_lora_disabled",
        )


def _validate_and_store(
    gateway: Gateway, upload: UploadFile, scratch: Path
) -> tuple[ValidatedAdapter, bool]:
    """Validate in a scratch folder, then move the canonical files into the store (atomic)."""
    settings = gateway.settings
    archive = scratch / "upload"
    with open(archive, "wb") as out:
        shutil.copyfileobj(upload.file, out, 1024 * 1024)
    validated = validate_upload(
        archive,
        scratch / "unpacked",
        gateway.spec,
        max_rank=settings.accepted_lora_rank,
        max_bytes=gateway.max_upload_bytes,
        tower_lora=gateway.tower_lora,
    )
    return validated, gateway.store.put(validated)


def _drop_blob_if_unused(gateway: Gateway, session: Session, digest: str) -> bool:
    """Remove the digest's blob if no version of any tenant uses it; whether it went. The last
    look happens with the blob out of sight (see `lorafleet.adapters.store`), so a concurrent
    upload never loses it."""
    if digest_in_use(session, digest):
        return False
    return gateway.store.delete(digest, keep=lambda: digest_in_use(session, digest))


def _register_stored(
    gateway: Gateway,
    session: Session,
    tenant: Tenant,
    name: str,
    validated: ValidatedAdapter,
    stored_now: bool,
) -> tuple[AdapterVersion, bool]:
    """Register an upload whose blob is stored; on failure, a blob stored for it alone goes
    again."""
    try:
        version, created = register_version(session, tenant, name, validated)
    except BaseException:
        session.rollback()
        if stored_now:
            # nothing half-registered is left behind
            _drop_blob_if_unused(gateway, session, validated.digest)
        raise
    # Put again now that the version is committed: a delete of the digest's last other version may
    # have removed the blob since the first put (a no-op when the blob is there).
    gateway.store.put(validated)
    return version, created


def _check_storage_limits(
    gateway: Gateway,
    session: Session,
    tenant: Tenant,
    name: str,
    validated: ValidatedAdapter,
    stored_now: bool,
) -> None:
    """429 (not to be retried) when one more version, or its bytes, would pass the tenant's
    storage limits; the blob stored for this upload alone goes again. Content the tenant has
    already is not counted twice: under `name` it makes no version, under another name a version
    sharing its blob."""
    policy = session.get(TenantPolicy, tenant.id)
    limits = Limits.defaults(gateway.settings).overridden(policy.limits if policy else None)
    count, size = stored_usage(session, tenant)
    with_content = (
        select(Adapter.name)
        .join(AdapterVersion)
        .where(Adapter.tenant_id == tenant.id, AdapterVersion.digest == validated.digest)
    )
    names = set(session.scalars(with_content))
    over = None
    if name in names:
        pass  # the upload returns that version
    elif limits.adapters and count >= limits.adapters:
        over = (
            f"tenant {tenant.name!r} stores {count} adapter versions, its limit of "
            f"{limits.adapters}"
        )
    elif not names and limits.adapter_bytes and size + validated.size_bytes > limits.adapter_bytes:
        over = (
            f"this upload ({validated.size_bytes} bytes) would take tenant {tenant.name!r} past "
            f"its limit of {limits.adapter_bytes} bytes of adapters stored ({size} used)"
        )
    if over is None:
        release_connection(session)
        return
    if stored_now:
        _drop_blob_if_unused(gateway, session, validated.digest)
    raise QuotaExceeded(
        f"{over}: delete versions first, or ask the operator to raise it",
        code="storage_limit_exceeded",
    )


@router.post("/adapters", status_code=201)
async def post_adapter(
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    name: Annotated[str, Form()],
    file: Annotated[UploadFile, File()],
) -> JSONResponse:
    """Upload a PEFT LoRA folder as .tar.gz or .zip (with the trainer's manifest.json beside
    adapter_config.json, kept on the version); the same content twice returns the existing
    version."""
    scratch = Path(await run_in_threadpool(tempfile.mkdtemp, dir=gateway.tmp_dir))
    try:
        validated, stored_now = await run_in_threadpool(_validate_and_store, gateway, file, scratch)
        await run_in_threadpool(
            _check_storage_limits, gateway, session, tenant, name, validated, stored_now
        )
        version, created = await run_in_threadpool(
            _register_stored, gateway, session, tenant, name, validated, stored_now
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    body = version_public(version).model_dump(mode="json")
    return JSONResponse(body, status_code=201 if created else 200)


@router.get("/adapters")
def get_adapters(session: SessionDep, tenant: CurrentTenant) -> list[AdapterPublic]:
    return [_adapter_public(a) for a in list_adapters(session, tenant)]


@router.get("/adapters/{name}")
def get_one_adapter(name: str, session: SessionDep, tenant: CurrentTenant) -> AdapterDetail:
    """The adapter's versions, each with the trainer's manifest uploaded beside it and whether
    its digest matches."""
    adapter = get_adapter(session, tenant, name)
    return AdapterDetail(name=adapter.name, versions=[version_detail(v) for v in adapter.versions])


@router.delete("/adapters/{name}/versions/{number}")
async def delete_adapter_version(
    name: str, number: int, gateway: GatewayDep, session: SessionDep, tenant: CurrentTenant
) -> AdapterVersionPublic:
    """Delete a version (refused while a deployment serves it); its blob goes when no tenant uses
    it."""
    version = await run_in_threadpool(resolve_version, session, tenant, f"{name}@{number}")
    public = version_public(version)
    await run_in_threadpool(delete_version, session, tenant, version)
    if await run_in_threadpool(_drop_blob_if_unused, gateway, session, version.digest):
        # a version uploaded since would only be loaded again
        await gateway.fleet.unload(version.digest)
    return public


@router.put("/deployments/{deployment}")
async def put_deployment(
    deployment: str,
    body: DeploymentPut,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
) -> DeploymentPublic:
    """Serve `adapter` (NAME, NAME@N or a digest) from now on; it is loaded before the switch."""
    version = await run_in_threadpool(resolve_version, session, tenant, body.adapter)
    # a failed load leaves the deployment as it was
    await prepare_engine(gateway, session, [version])
    result = await run_in_threadpool(set_deployment, session, tenant, deployment, version)
    return deployment_public(result)


@router.get("/deployments")
def get_deployments(session: SessionDep, tenant: CurrentTenant) -> list[DeploymentPublic]:
    return [deployment_public(d) for d in list_deployments(session, tenant)]


WindowS = Annotated[
    float, Query(ge=MIN_WINDOW_S, le=MAX_WINDOW_S, description="seconds back from now")
]


@router.get("/deployments/{deployment}/traffic")
def get_traffic(
    deployment: str,
    gateway: GatewayDep,
    session: SessionDep,
    tenant: CurrentTenant,
    window_s: WindowS = DEFAULT_WINDOW_S,
) -> DeploymentTraffic:
    """The deployment's requests of the last `window_s` seconds: rate, errors (5xx) and client
    errors (4xx), latency p50/p95/mean of the answered ones, in total and per (variant, adapter).
    This gateway's buffered request-log rows are written first; another gateway's arrive within
    its flush period."""
    gateway.request_log.flush()  # before the read: what this gateway has just served counts
    return deployment_traffic(
        session, get_deployment(session, tenant, deployment), window_s, time.time()
    )
