"""Catalog operations. Every read goes through a tenant-scoped query, so another tenant's
adapter or deployment is simply not found (404), never forbidden (403): names do not leak."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import cast

from sqlalchemy import CursorResult, Select, delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import (
    Adapter,
    AdapterVersion,
    Deployment,
    DriftCheck,
    Rollout,
    Tenant,
    ValidationRun,
    is_transient,
)
from lorafleet.adapters.names import check_name
from lorafleet.adapters.tenants import authenticate, create_tenant, hash_key
from lorafleet.adapters.validate import ValidatedAdapter
from lorafleet.errors import Conflict, InvalidRequest, NotFound

__all__ = [
    "hash_key",
    "create_tenant",
    "authenticate",
    "readable_adapters",
    "get_adapter",
    "list_adapters",
    "register_version",
    "resolve_version",
    "delete_version",
    "set_deployment",
    "get_deployment",
    "list_deployments",
    "deployed_digests",
    "deployed_workload",
    "digest_in_use",
]

_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_name") from exc


def readable_adapters(tenant: Tenant) -> Select[Adapter]:
    return select(Adapter).where(Adapter.tenant_id == tenant.id)


def _readable_versions(tenant: Tenant) -> Select[AdapterVersion]:
    return select(AdapterVersion).join(Adapter).where(Adapter.tenant_id == tenant.id)


def _readable_deployments(tenant: Tenant) -> Select[Deployment]:
    return select(Deployment).where(Deployment.tenant_id == tenant.id)


def list_adapters(session: Session, tenant: Tenant) -> list[Adapter]:
    return list(session.scalars(readable_adapters(tenant).order_by(Adapter.name)))


def get_adapter(session: Session, tenant: Tenant, name: str) -> Adapter:
    adapter = session.scalar(readable_adapters(tenant).where(Adapter.name == name))
    if adapter is None:
        raise NotFound(f"adapter {name!r} not found", code="adapter_not_found")
    return adapter


REGISTER_ATTEMPTS = 3  # concurrent uploads to one new name: the loser of the insert looks again


def register_version(
    session: Session, tenant: Tenant, name: str, validated: ValidatedAdapter
) -> tuple[AdapterVersion, bool]:
    """Add a version under `name`, with the manifest uploaded beside it; same content as an
    existing version of `name` returns that one (its manifest as first uploaded). Content the
    tenant stores under another name gets a version of `name` (the blob is shared). Concurrent
    uploads are safe: identical ones get one version (one creates it, the others find it),
    different ones get distinct numbers."""
    _valid_name(name)
    for attempt in range(REGISTER_ATTEMPTS):
        try:
            return _register_once(session, tenant, name, validated)
        # another upload created the adapter or took the number first
        except (IntegrityError, DBAPIError) as exc:
            if not isinstance(exc, IntegrityError) and not is_transient(exc):
                raise
            session.rollback()
            if attempt == REGISTER_ATTEMPTS - 1:
                raise Conflict(
                    f"adapter {name!r} changed during {REGISTER_ATTEMPTS} attempts to add this "
                    "version; retry the upload",
                    code="concurrent_update",
                ) from exc
    raise AssertionError("unreachable")


def _version_with_digest(
    session: Session, tenant: Tenant, name: str, digest: str
) -> AdapterVersion | None:
    """The version of adapter `name` with this content, if there is one."""
    return session.scalar(
        _readable_versions(tenant)
        .where(Adapter.name == name, AdapterVersion.digest == digest)
        .limit(1)
    )


def _claim_number(session: Session, adapter: Adapter) -> int:
    """The adapter's next version number, taken by one UPDATE: it holds the write lock (SQLite)
    or the row lock (Postgres) until commit, so concurrent uploads to one name take their numbers
    one after the other."""
    claimed = session.execute(
        update(Adapter)
        .where(Adapter.id == adapter.id)
        .values(next_version=Adapter.next_version + 1)
        .returning(Adapter.next_version)
    )
    return claimed.scalar_one() - 1


def _register_once(
    session: Session, tenant: Tenant, name: str, validated: ValidatedAdapter
) -> tuple[AdapterVersion, bool]:
    if (existing := _version_with_digest(session, tenant, name, validated.digest)) is not None:
        return existing, False
    # Postgres: one tenant's uploads take turns, so the second look for the same content below sees
    # the others' (SQLite has one writer at a time anyway).
    session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
    adapter = session.scalar(readable_adapters(tenant).where(Adapter.name == name))
    if adapter is None:
        adapter = Adapter(tenant_id=tenant.id, name=name)
        session.add(adapter)
        session.flush()  # IntegrityError when another upload created it meanwhile
    number = _claim_number(session, adapter)
    if (existing := _version_with_digest(session, tenant, name, validated.digest)) is not None:
        session.rollback()  # the same content was committed while this upload waited for the lock
        session.refresh(existing)  # rollback expired it
        return existing, False
    version = AdapterVersion(
        adapter=adapter,
        version=number,
        digest=validated.digest,
        rank=validated.rank,
        alpha=validated.alpha,
        target_modules=list(validated.target_modules),
        size_bytes=validated.size_bytes,
        manifest=validated.manifest,
        parts=list(validated.parts),
    )
    session.add(version)
    session.commit()
    return version, True


def resolve_version(session: Session, tenant: Tenant, ref: str) -> AdapterVersion:
    """`NAME` (latest version), `NAME@N`, or a digest (optionally `sha256:`-prefixed)."""
    if digest := _DIGEST.match(ref):
        found = session.scalar(_readable_versions(tenant).where(AdapterVersion.digest == digest[1]))
        if found is None:
            raise NotFound(f"no adapter version with digest {digest[1]}", code="adapter_not_found")
        return found
    name, _, number = ref.partition("@")
    if number and not number.isdigit():
        raise InvalidRequest(f"invalid adapter reference {ref!r}: use NAME, NAME@N or a digest")
    adapter = get_adapter(session, tenant, name)
    if not adapter.versions:
        raise NotFound(f"adapter {name!r} has no versions", code="adapter_not_found")
    if not number:
        return adapter.versions[-1]
    for version in adapter.versions:
        if version.version == int(number):
            return version
    raise NotFound(f"adapter {name!r} has no version {number}", code="adapter_not_found")


def digest_in_use(session: Session, digest: str) -> bool:
    """Whether any tenant has a version with this content (the blob is shared)."""
    return (
        session.scalar(select(AdapterVersion.id).where(AdapterVersion.digest == digest).limit(1))
        is not None
    )


def _in_active_rollouts(session: Session, tenant: Tenant) -> list[tuple[str, set[int]]]:
    rows = session.execute(
        select(Deployment.name, Rollout.variants)
        .join(Rollout, Rollout.id == Deployment.rollout_id)
        .where(Deployment.tenant_id == tenant.id)
    )
    return [(name, {v["version_id"] for v in variants}) for name, variants in rows]


def _refuse_referenced(session: Session, tenant: Tenant, version: AdapterVersion) -> None:
    """409 naming what still refers to the version: deployments that serve it, then recorded
    history."""
    ref = f"{version.adapter.name}@{version.version}"
    users = [
        d.name
        for d in session.scalars(
            _readable_deployments(tenant).where(Deployment.stable_id == version.id)
        )
    ]
    users += [
        name
        for name, ids in _in_active_rollouts(session, tenant)
        if version.id in ids and name not in users
    ]
    if users:
        raise Conflict(
            f"{ref} is deployed by {', '.join(users)}; deploy another version first",
            code="version_deployed",
        )
    # Validation runs and drift checks hold a foreign key to the version (not nullable): deleting it
    # would delete what they measured. Finished rollouts name versions only inside their JSON and do
    # not hold them.
    runs = session.scalar(select(func.count()).where(ValidationRun.version_id == version.id)) or 0
    checks = session.scalar(select(func.count()).where(DriftCheck.version_id == version.id)) or 0
    if runs or checks:
        raise Conflict(
            f"{ref} is referred to by its recorded history ({runs} validation runs, {checks} drift "
            "checks), which the catalog keeps; the version stays",
            code="version_has_history",
        )


def delete_version(session: Session, tenant: Tenant, version: AdapterVersion) -> None:
    """Delete a version that `resolve_version` found for this tenant, unless a deployment serves
    it or recorded history refers to it (409 naming which)."""
    name, number = version.adapter.name, version.version
    _refuse_referenced(session, tenant, version)
    for deployment in session.scalars(
        _readable_deployments(tenant).where(Deployment.previous_stable_id == version.id)
    ):
        deployment.previous_stable = None  # `undo` can no longer go back to it
    try:
        result = session.execute(delete(AdapterVersion).where(AdapterVersion.id == version.id))
        deleted = cast(CursorResult, result).rowcount
        if not deleted:  # a concurrent delete of the same version won
            session.rollback()
            raise NotFound(f"adapter {name!r} has no version {number}", code="adapter_not_found")
        session.commit()
        session.expunge(version)
    except IntegrityError as exc:  # something came to refer to it between the check and the delete
        session.rollback()
        _refuse_referenced(session, tenant, version)
        raise Conflict(
            f"{name}@{number} is referred to by another catalog row; retry",
            code="version_referenced",
        ) from exc


def set_deployment(
    session: Session, tenant: Tenant, name: str, version: AdapterVersion
) -> Deployment:
    """Point deployment `name` at a version `resolve_version` found (creating the deployment if
    needed)."""
    _valid_name(name)
    deployment = session.scalar(_readable_deployments(tenant).where(Deployment.name == name))
    if deployment is None:
        deployment = Deployment(tenant_id=tenant.id, name=name, stable=version)
        session.add(deployment)
    elif deployment.rollout_id is not None:
        raise Conflict(
            f"a rollout or A/B test is running on {name!r}: abort or stop it first",
            code="rollout_running",
        )
    elif deployment.stable_id != version.id:
        deployment.previous_stable, deployment.stable = deployment.stable, version
    session.commit()
    return deployment


def get_deployment(session: Session, tenant: Tenant, name: str) -> Deployment:
    deployment = session.scalar(_readable_deployments(tenant).where(Deployment.name == name))
    if deployment is None:
        raise NotFound(f"The model `{name}` does not exist", code="model_not_found")
    return deployment


def list_deployments(session: Session, tenant: Tenant) -> list[Deployment]:
    return list(session.scalars(_readable_deployments(tenant).order_by(Deployment.name)))


def deployed_digests(session: Session) -> set[str]:
    """Every digest some deployment or active rollout serves: what a restarted engine must have
    registered."""
    stable = set(
        session.scalars(
            select(AdapterVersion.digest).join(
                Deployment, Deployment.stable_id == AdapterVersion.id
            )
        )
    )
    variants = session.scalars(
        select(Rollout.variants).join(Deployment, Deployment.rollout_id == Rollout.id)
    )
    return stable | {v["digest"] for table in variants for v in table}


def deployed_workload(session: Session, adding: Iterable[AdapterVersion] = ()) -> tuple[int, int]:
    """(distinct adapters that deployments and active rollouts serve, with `adding`; their
    largest rank, 0 if none): what the engine is sized for."""
    digests = deployed_digests(session) | {v.digest for v in adding}
    largest = session.scalar(
        select(func.max(AdapterVersion.rank)).where(AdapterVersion.digest.in_(digests))
    )
    return len(digests), largest or 0
