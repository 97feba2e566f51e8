"""Tenants' lifecycle in the catalog: API keys (several per tenant, rotated with a grace period,
revoked, expiring), limits set by the admin, disabling, deletion, and the audit trail of admin
operations."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import cast

from sqlalchemy import CursorResult, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    ApiKey,
    AuditEvent,
    Batch,
    BatchLine,
    Budget,
    Capture,
    Decision,
    Deployment,
    DriftCheck,
    Feedback,
    InputSample,
    RequestRecord,
    Rollout,
    RolloutSample,
    StoredFile,
    Tenant,
    TenantPolicy,
    UsageDay,
    ValidationRun,
    ValidationSet,
)
from lorafleet.adapters.names import check_name
from lorafleet.errors import Conflict, InvalidRequest, NotFound, Unauthorized

__all__ = [
    "hash_key",
    "create_tenant",
    "authenticate",
    "authenticate_key",
    "check_not_expired",
    "get_tenant",
    "tenant_policy",
    "new_key",
    "list_keys",
    "revoke_key",
    "rotate_key",
    "touch_keys",
    "set_limits",
    "set_prices",
    "set_disabled",
    "delete_tenant",
    "DeletedTenant",
    "record_audit",
    "list_audit",
    "stored_usage",
]


def hash_key(api_key: str) -> str:
    """Keys are 256-bit random tokens, so a plain sha256 is a safe, fast, indexable hash."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogateescape")).hexdigest()


def _new_secret() -> str:
    return "lf-" + secrets.token_urlsafe(32)


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """Create a tenant with its first API key; return both (the only time the key exists in
    clear)."""
    try:
        check_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_name") from exc
    api_key = _new_secret()
    tenant = Tenant(name=name, key_hash=hash_key(api_key))
    session.add(tenant)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"tenant {name!r} already exists", code="tenant_exists") from exc
    session.add(_key_row(tenant, api_key, "first", None))
    session.commit()
    return tenant, api_key


def _key_row(tenant: Tenant, api_key: str, label: str, expires_at: float | None) -> ApiKey:
    return ApiKey(
        tenant_id=tenant.id,
        key_hash=hash_key(api_key),
        prefix=api_key[:8],
        label=label,
        created_at=time.time(),
        expires_at=expires_at,
        revoked_at=None,
        last_used_at=None,
    )


def authenticate_key(
    session: Session, api_key: str | None, now: float | None = None
) -> tuple[Tenant, ApiKey, TenantPolicy | None]:
    """The tenant, key and policy a live key belongs to; 401 with the reason for anything else."""
    if not api_key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    found = session.execute(
        select(Tenant, ApiKey)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == hash_key(api_key))
    ).first()
    if found is None:
        raise Unauthorized("invalid API key")
    tenant, key = found
    now = time.time() if now is None else now
    if key.revoked_at is not None:
        raise Unauthorized(
            "this API key was revoked; use another key of the tenant", code="api_key_revoked"
        )
    check_not_expired(key.expires_at, now)
    policy = session.get(TenantPolicy, tenant.id)
    if policy is not None and policy.disabled_at is not None:
        reason = f": {policy.disabled_reason}" if policy.disabled_reason else ""
        raise Unauthorized(
            f"tenant {tenant.name!r} is disabled{reason}; ask the operator to enable it",
            code="tenant_disabled",
        )
    return tenant, key, policy


def check_not_expired(expires_at: float | None, now: float) -> None:
    """401 `api_key_expired` once a key's expiry has passed."""
    if expires_at is not None and expires_at <= now:
        expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires_at))
        raise Unauthorized(f"this API key expired at {expired}", code="api_key_expired")


def authenticate(session: Session, api_key: str | None) -> Tenant:
    """The tenant of a live key (see `authenticate_key`)."""
    return authenticate_key(session, api_key)[0]


def get_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise NotFound(f"tenant {name!r} not found", code="tenant_not_found")
    return tenant


def tenant_policy(session: Session, tenant: Tenant) -> TenantPolicy:
    """The tenant's policy row, created (unsaved) with the defaults when it has none."""
    policy = session.get(TenantPolicy, tenant.id)
    if policy is None:
        policy = TenantPolicy(
            tenant_id=tenant.id,
            limits={},
            disabled_at=None,
            disabled_reason="",
            updated_at=time.time(),
        )
        session.add(policy)
    return policy


def new_key(
    session: Session, tenant: Tenant, label: str = "", expires_at: float | None = None
) -> tuple[ApiKey, str]:
    """Another key for the tenant; returned in clear only now."""
    if expires_at is not None and expires_at <= time.time():
        raise InvalidRequest("the key's expiry is in the past", code="invalid_expiry")
    api_key = _new_secret()
    key = _key_row(tenant, api_key, label, expires_at)
    session.add(key)
    session.commit()
    return key, api_key


def list_keys(session: Session, tenant: Tenant) -> list[ApiKey]:
    return list(
        session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.id))
    )


def _key(session: Session, tenant: Tenant, key_id: int) -> ApiKey:
    key = session.scalar(select(ApiKey).where(ApiKey.tenant_id == tenant.id, ApiKey.id == key_id))
    if key is None:
        raise NotFound(f"tenant {tenant.name!r} has no key {key_id}", code="api_key_not_found")
    return key


def revoke_key(session: Session, tenant: Tenant, key_id: int) -> ApiKey:
    """The key stops authenticating now (revoking twice keeps the first time)."""
    key = _key(session, tenant, key_id)
    key.revoked_at = key.revoked_at or time.time()
    session.commit()
    return key


def rotate_key(
    session: Session, tenant: Tenant, key_id: int, grace_s: float
) -> tuple[ApiKey, ApiKey, str]:
    """A new key replacing `key_id`, which keeps working for `grace_s` more seconds (0: stops
    now)."""
    if grace_s < 0:
        raise InvalidRequest("grace_s must be 0 or more", code="invalid_grace")
    old = _key(session, tenant, key_id)
    if old.revoked_at is not None or (old.expires_at is not None and old.expires_at <= time.time()):
        raise Conflict(
            f"key {key_id} is no longer valid: create a new key instead", code="api_key_not_live"
        )
    ends = time.time() + grace_s
    old.expires_at = min(old.expires_at, ends) if old.expires_at is not None else ends
    api_key = _new_secret()
    key = _key_row(tenant, api_key, old.label, None)
    session.add(key)
    session.commit()
    return old, key, api_key


def touch_keys(session: Session, used: dict[int, float]) -> None:
    """Record when keys were last used (the gateway batches this, about once a minute)."""
    for key_id, at in used.items():
        key = session.get(ApiKey, key_id)
        if key is not None and (key.last_used_at or 0) < at:
            key.last_used_at = at
    session.commit()


def set_limits(session: Session, tenant: Tenant, changes: dict[str, int | None]) -> TenantPolicy:
    """Set (a number) or reset to the default (None) some of the tenant's limits."""
    policy = tenant_policy(session, tenant)
    policy.limits = _overridden(policy.limits, changes)
    policy.updated_at = time.time()
    session.commit()
    return policy


def set_prices(session: Session, tenant: Tenant, changes: dict[str, float | None]) -> TenantPolicy:
    """Set (a number) or reset to the default (None) some of the tenant's prices."""
    policy = tenant_policy(session, tenant)
    policy.prices = _overridden(policy.prices, changes)
    policy.updated_at = time.time()
    session.commit()
    return policy


def _overridden(overrides: dict | None, changes: dict) -> dict:
    """The tenant's own values with `changes` (None: back to the default, so dropped)."""
    result = dict(overrides or {})
    for name, value in changes.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def set_disabled(
    session: Session, tenant: Tenant, disabled: bool, reason: str = ""
) -> TenantPolicy:
    """Disable (every key answers 401 with the reason) or enable the tenant."""
    policy = tenant_policy(session, tenant)
    policy.disabled_at = (policy.disabled_at or time.time()) if disabled else None
    policy.disabled_reason = reason if disabled else ""
    policy.updated_at = time.time()
    session.commit()
    return policy


def stored_usage(session: Session, tenant: Tenant) -> tuple[int, int]:
    """(adapter versions the tenant stores, the bytes of their distinct contents: versions of
    several names with one content share one blob)."""
    mine = select(AdapterVersion.digest, AdapterVersion.size_bytes).join(Adapter)
    mine = mine.where(Adapter.tenant_id == tenant.id)
    count = session.scalar(select(func.count()).select_from(mine.subquery()))
    blobs = mine.distinct().subquery()
    size = session.scalar(select(func.coalesce(func.sum(blobs.c.size_bytes), 0)))
    return int(count or 0), int(size or 0)


@dataclass(frozen=True)
class DeletedTenant:
    """What deleting a tenant removed: the blobs it referenced, for the caller to delete where no
    one else uses them."""

    name: str
    adapter_digests: frozenset[str]
    validation_digests: frozenset[str]
    counts: dict[str, int]
    file_digests: frozenset[str] = frozenset()  # its files' bytes (batch inputs and outputs)


def delete_tenant(session: Session, tenant: Tenant, force: bool = False) -> DeletedTenant:
    """Remove the tenant and everything it owns in one transaction; refused while one of its
    rollouts or A/B tests runs, unless `force` (which ends them with the tenant)."""
    deployments = select(Deployment.id).where(Deployment.tenant_id == tenant.id)
    running = list(
        session.scalars(
            select(Deployment.name).where(
                Deployment.tenant_id == tenant.id, Deployment.rollout_id.is_not(None)
            )
        )
    )
    if running and not force:
        raise Conflict(
            f"tenant {tenant.name!r} has a rollout or A/B test running on "
            f"{', '.join(running)}: abort it first, or delete with force",
            code="rollout_running",
        )
    versions = select(AdapterVersion.id).join(Adapter).where(Adapter.tenant_id == tenant.id)
    adapter_digests = frozenset(
        session.scalars(select(AdapterVersion.digest).where(AdapterVersion.id.in_(versions)))
    )
    validation_digests = frozenset(
        session.scalars(select(ValidationSet.digest).where(ValidationSet.tenant_id == tenant.id))
    )
    file_digests = frozenset(
        session.scalars(select(StoredFile.digest).where(StoredFile.tenant_id == tenant.id))
    )
    rollouts = select(Rollout.id).where(Rollout.deployment_id.in_(deployments))
    batches = select(Batch.id).where(Batch.tenant_id == tenant.id)
    steps = [  # children first: the foreign keys hold at every statement
        ("rollout_samples", delete(RolloutSample).where(RolloutSample.rollout_id.in_(rollouts))),
        ("decisions", delete(Decision).where(Decision.deployment_id.in_(deployments))),
        (
            "validation_runs",
            delete(ValidationRun).where(ValidationRun.deployment_id.in_(deployments)),
        ),
        ("input_samples", delete(InputSample).where(InputSample.deployment_id.in_(deployments))),
        ("drift_checks", delete(DriftCheck).where(DriftCheck.deployment_id.in_(deployments))),
        ("rollouts", delete(Rollout).where(Rollout.deployment_id.in_(deployments))),
        ("deployments", delete(Deployment).where(Deployment.tenant_id == tenant.id)),
        ("validation_sets", delete(ValidationSet).where(ValidationSet.tenant_id == tenant.id)),
        ("adapter_versions", delete(AdapterVersion).where(AdapterVersion.id.in_(versions))),
        ("adapters", delete(Adapter).where(Adapter.tenant_id == tenant.id)),
        ("api_keys", delete(ApiKey).where(ApiKey.tenant_id == tenant.id)),
        ("tenant_policies", delete(TenantPolicy).where(TenantPolicy.tenant_id == tenant.id)),
        ("requests", delete(RequestRecord).where(RequestRecord.tenant_id == tenant.id)),
        ("feedback", delete(Feedback).where(Feedback.tenant_id == tenant.id)),
        # their images: gc's orphans
        ("captures", delete(Capture).where(Capture.tenant_id == tenant.id)),
        ("batch_lines", delete(BatchLine).where(BatchLine.batch_id.in_(batches))),
        ("batches", delete(Batch).where(Batch.tenant_id == tenant.id)),
        ("files", delete(StoredFile).where(StoredFile.tenant_id == tenant.id)),
        ("usage_days", delete(UsageDay).where(UsageDay.tenant_id == tenant.id)),
        ("budgets", delete(Budget).where(Budget.tenant_id == tenant.id)),
    ]
    counts = {}
    try:
        for name, statement in steps:
            result = session.execute(statement.execution_options(synchronize_session=False))
            counts[name] = cast(CursorResult, result).rowcount
        session.execute(delete(Tenant).where(Tenant.id == tenant.id))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return DeletedTenant(tenant.name, adapter_digests, validation_digests, counts, file_digests)


def record_audit(
    session: Session, actor: str, action: str, tenant: str = "", **details: object
) -> AuditEvent:
    """Append one admin operation to the audit trail."""
    event = AuditEvent(at=time.time(), actor=actor, action=action, tenant=tenant, details=details)
    session.add(event)
    session.commit()
    return event


def list_audit(
    session: Session, tenant: str | None = None, limit: int = 100, before: int | None = None
) -> list[AuditEvent]:
    """The newest events first (`before`: an event id, for the next page)."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if tenant:
        query = query.where(AuditEvent.tenant == tenant)
    if before is not None:
        query = query.where(AuditEvent.id < before)
    return list(session.scalars(query))
