"""Catalog operations. Every read goes through a tenant-scoped query, so another tenant's
adapter or deployment is simply not found (404), never forbidden (403): names do not leak."""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable

from sqlalchemy import Select, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lorafleet.adapters.catalog import Adapter, AdapterVersion, Deployment, Rollout, Tenant
from lorafleet.adapters.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from lorafleet.adapters.schemas import check_name
from lorafleet.adapters.validate import ValidatedAdapter

__all__ = ["hash_key", "create_tenant", "authenticate", "readable_adapters", "get_adapter", "list_adapters",
           "register_version", "resolve_version", "delete_version", "set_deployment", "get_deployment",
           "list_deployments", "deployed_digests", "deployed_workload", "digest_in_use"]

_DIGEST = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")


def hash_key(api_key: str) -> str:
    """Keys are 256-bit random tokens, so a plain sha256 is a safe, fast, indexable hash."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def _valid_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="invalid_name") from exc


def create_tenant(session: Session, name: str) -> tuple[Tenant, str]:
    """Create a tenant; return it with its API key (the only time the key exists in clear)."""
    _valid_name(name)
    api_key = "lf-" + secrets.token_urlsafe(32)
    tenant = Tenant(name=name, key_hash=hash_key(api_key))
    session.add(tenant)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise Conflict(f"tenant {name!r} already exists", code="tenant_exists") from exc
    return tenant, api_key


def authenticate(session: Session, api_key: str | None) -> Tenant:
    if not api_key:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = session.scalar(select(Tenant).where(Tenant.key_hash == hash_key(api_key)))
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


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


def register_version(session: Session, tenant: Tenant, name: str,
                     validated: ValidatedAdapter) -> tuple[AdapterVersion, bool]:
    """Add a version under `name`; same content as an existing version of this tenant returns that one."""
    _valid_name(name)
    existing = session.scalar(_readable_versions(tenant).where(AdapterVersion.digest == validated.digest))
    if existing is not None:
        return existing, False
    adapter = session.scalar(readable_adapters(tenant).where(Adapter.name == name).with_for_update())
    if adapter is None:
        adapter = Adapter(tenant_id=tenant.id, name=name)
        session.add(adapter)
        session.flush()
    version = AdapterVersion(adapter=adapter, version=adapter.next_version, digest=validated.digest,
                             rank=validated.rank, alpha=validated.alpha,
                             target_modules=list(validated.target_modules), size_bytes=validated.size_bytes)
    adapter.next_version += 1
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
    """Whether any tenant still has a version with this content (the blob is shared)."""
    return (session.scalar(select(func.count()).where(AdapterVersion.digest == digest)) or 0) > 0


def _in_active_rollouts(session: Session, tenant: Tenant) -> list[tuple[str, set[int]]]:
    rows = session.execute(select(Deployment.name, Rollout.variants).join(Rollout, Rollout.id == Deployment.rollout_id)
                           .where(Deployment.tenant_id == tenant.id))
    return [(name, {v["version_id"] for v in variants}) for name, variants in rows]


def delete_version(session: Session, tenant: Tenant, version: AdapterVersion) -> None:
    """Delete a version that `resolve_version` found for this tenant, unless a deployment serves it."""
    users = [d.name for d in session.scalars(_readable_deployments(tenant).where(Deployment.stable_id == version.id))]
    users += [name for name, ids in _in_active_rollouts(session, tenant) if version.id in ids and name not in users]
    if users:
        raise Conflict(f"{version.adapter.name}@{version.version} is deployed by "
                       f"{', '.join(users)}; deploy another version first", code="version_deployed")
    for deployment in session.scalars(_readable_deployments(tenant).where(Deployment.previous_stable_id == version.id)):
        deployment.previous_stable = None  # `undo` can no longer go back to it
    session.delete(version)
    session.commit()


def set_deployment(session: Session, tenant: Tenant, name: str, version: AdapterVersion) -> Deployment:
    """Point deployment `name` at a version `resolve_version` found (creating the deployment if needed)."""
    _valid_name(name)
    deployment = session.scalar(_readable_deployments(tenant).where(Deployment.name == name))
    if deployment is None:
        deployment = Deployment(tenant_id=tenant.id, name=name, stable=version)
        session.add(deployment)
    elif deployment.rollout_id is not None:
        raise Conflict(f"a rollout or A/B test is running on {name!r}: abort or stop it first", code="rollout_running")
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
    """Every digest some deployment or active rollout serves: what a restarted engine must have registered."""
    stable = set(session.scalars(select(AdapterVersion.digest)
                                 .join(Deployment, Deployment.stable_id == AdapterVersion.id)))
    variants = session.scalars(select(Rollout.variants).join(Deployment, Deployment.rollout_id == Rollout.id))
    return stable | {v["digest"] for table in variants for v in table}


def deployed_workload(session: Session, adding: Iterable[AdapterVersion] = ()) -> tuple[int, int]:
    """(distinct adapters that deployments and active rollouts serve, with `adding`; their largest rank, 0 if
    none): what the engine is sized for."""
    digests = deployed_digests(session) | {v.digest for v in adding}
    largest = session.scalar(select(func.max(AdapterVersion.rank)).where(AdapterVersion.digest.in_(digests)))
    return len(digests), largest or 0
