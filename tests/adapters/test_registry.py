"""Catalog operations on a real SQLite file: numbering, references, scoping, deletion rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.adapters.catalog import open_catalog
from lorafleet.adapters.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from lorafleet.adapters.registry import (
    authenticate,
    create_tenant,
    delete_version,
    deployed_digests,
    get_deployment,
    list_adapters,
    register_version,
    resolve_version,
    set_deployment,
)
from lorafleet.adapters.validate import ValidatedAdapter


def _validated(digest_char: str) -> ValidatedAdapter:
    return ValidatedAdapter(path=Path("."), digest=digest_char * 64, rank=8, alpha=16.0,
                            target_modules=("q_proj",), size_bytes=10)


@pytest.fixture
def session(tmp_path):
    _, sessions = open_catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    with sessions() as s:
        yield s


def test_api_key_authenticates_only_its_tenant(session):
    acme, key = create_tenant(session, "acme")
    create_tenant(session, "globex")
    assert authenticate(session, key).id == acme.id
    with pytest.raises(Unauthorized):
        authenticate(session, key + "x")
    with pytest.raises(Unauthorized):
        authenticate(session, None)


def test_keys_are_stored_hashed(session):
    tenant, key = create_tenant(session, "acme")
    assert key not in tenant.key_hash and len(tenant.key_hash) == 64


def test_duplicate_tenant_is_a_conflict(session):
    create_tenant(session, "acme")
    with pytest.raises(Conflict):
        create_tenant(session, "acme")


def test_invalid_names_are_refused(session):
    with pytest.raises(InvalidRequest):
        create_tenant(session, "../etc")


def test_versions_count_up_and_same_content_returns_the_existing_one(session):
    tenant, _ = create_tenant(session, "acme")
    v1, created1 = register_version(session, tenant, "ext", _validated("a"))
    v2, created2 = register_version(session, tenant, "ext", _validated("b"))
    again, created3 = register_version(session, tenant, "ext", _validated("a"))
    assert (v1.version, v2.version, again.version) == (1, 2, 1)
    assert (created1, created2, created3) == (True, True, False)


def test_references_resolve_by_name_number_and_digest(session):
    tenant, _ = create_tenant(session, "acme")
    register_version(session, tenant, "ext", _validated("a"))
    register_version(session, tenant, "ext", _validated("b"))
    assert resolve_version(session, tenant, "ext").version == 2
    assert resolve_version(session, tenant, "ext@1").digest == "a" * 64
    assert resolve_version(session, tenant, "sha256:" + "b" * 64).version == 2
    with pytest.raises(NotFound):
        resolve_version(session, tenant, "ext@9")
    with pytest.raises(InvalidRequest):
        resolve_version(session, tenant, "ext@latest")


def test_another_tenants_adapters_are_not_found(session):
    acme, _ = create_tenant(session, "acme")
    globex, _ = create_tenant(session, "globex")
    register_version(session, acme, "ext", _validated("a"))
    assert list_adapters(session, globex) == []
    for ref in ("ext", "ext@1", "a" * 64):
        with pytest.raises(NotFound):
            resolve_version(session, globex, ref)


def test_deployed_version_cannot_be_deleted_and_numbers_are_not_reused(session):
    tenant, _ = create_tenant(session, "acme")
    v1, _ = register_version(session, tenant, "ext", _validated("a"))
    v2, _ = register_version(session, tenant, "ext", _validated("b"))
    set_deployment(session, tenant, "invoice", v2)
    with pytest.raises(Conflict):
        delete_version(session, tenant, v2)
    assert deployed_digests(session) == {"b" * 64}
    delete_version(session, tenant, v1)
    set_deployment(session, tenant, "invoice", resolve_version(session, tenant, "ext@2"))
    v3, _ = register_version(session, tenant, "ext", _validated("c"))
    assert v3.version == 3


def test_deployment_is_scoped_to_its_tenant(session):
    acme, _ = create_tenant(session, "acme")
    globex, _ = create_tenant(session, "globex")
    v1, _ = register_version(session, acme, "ext", _validated("a"))
    set_deployment(session, acme, "invoice", v1)
    assert get_deployment(session, acme, "invoice").stable.digest == "a" * 64
    with pytest.raises(NotFound):
        get_deployment(session, globex, "invoice")
