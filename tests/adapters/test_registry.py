"""Catalog operations on a real SQLite file: numbering, references, scoping, deletion rules."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import func, select

from lorafleet.adapters.catalog import (
    AdapterVersion,
    DriftCheck,
    Rollout,
    Tenant,
    ValidationRun,
    ValidationSet,
    open_catalog,
)
from lorafleet.adapters.registry import (
    authenticate,
    create_tenant,
    delete_version,
    deployed_digests,
    digest_in_use,
    get_deployment,
    list_adapters,
    register_version,
    resolve_version,
    set_deployment,
)
from lorafleet.adapters.store import open_store
from lorafleet.adapters.validate import CONFIG_FILE, WEIGHTS_FILE, ValidatedAdapter
from lorafleet.errors import Conflict, InvalidRequest, NotFound, Unauthorized
from lorafleet.serve.api.adapters import _drop_blob_if_unused, _register_stored


def _validated(digest_char: str) -> ValidatedAdapter:
    return ValidatedAdapter(
        path=Path("."),
        digest=digest_char * 64,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        size_bytes=10,
    )


@pytest.fixture
def session(catalog_url):
    _, sessions = open_catalog(catalog_url)
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


def test_a_version_keeps_the_manifest_of_its_first_upload(session):
    """The manifest is informational: the same content with another manifest (or none) is the
    same version."""
    from dataclasses import replace

    tenant, _ = create_tenant(session, "acme")
    manifest = {"adapter_digest": "a" * 64, "training": {"steps": 12, "best_val_loss": None}}
    first, _ = register_version(session, tenant, "ext", replace(_validated("a"), manifest=manifest))
    again, created = register_version(
        session, tenant, "ext", replace(_validated("a"), manifest={"other": 1})
    )
    register_version(session, tenant, "ext", _validated("b"))
    session.expunge_all()  # read back from the database
    assert (again.id, created) == (first.id, False)
    assert resolve_version(session, tenant, "ext@1").manifest == manifest
    assert resolve_version(session, tenant, "ext@2").manifest is None
    stored_null = select(func.count()).where(AdapterVersion.manifest.is_(None))
    assert session.scalar(stored_null) == 1  # SQL NULL, as versions from before revision 0004


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


# --- concurrent uploads and deletes: real SQLite file, real threads, each with its own session ---


def _in_threads(sessions, *work) -> list:
    """Run each `work(session)` in its own thread, all released at once; return results (or
    exceptions)."""
    start = threading.Barrier(len(work))
    results: list = [None] * len(work)

    def run(i: int) -> None:
        with sessions() as s:
            start.wait()
            try:
                results[i] = work[i](s)
            except Exception as exc:  # noqa: BLE001 (the test asserts on it)
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


@pytest.fixture
def sessions(catalog_url):
    return open_catalog(catalog_url)[1]


def _tenant(sessions, name: str = "acme") -> Tenant:
    with sessions() as s:
        return create_tenant(s, name)[0]


@pytest.mark.parametrize("existing_adapter", [False, True])
def test_concurrent_identical_uploads_give_one_version(sessions, existing_adapter):
    tenant = _tenant(sessions)
    if existing_adapter:
        with sessions() as s:
            register_version(s, tenant, "ext", _validated("0"))
    for round_ in range(5):
        digest = "abcdef"[round_]
        results = _in_threads(
            sessions, *[lambda s, d=digest: register_version(s, tenant, "ext", _validated(d))] * 4
        )
        assert not [r for r in results if isinstance(r, Exception)], results
        assert sorted(created for _, created in results) == [False, False, False, True]
        assert len({version.id for version, _ in results}) == 1
    with sessions() as s:
        numbers = [v.version for v in resolve_version(s, tenant, "ext").adapter.versions]
    assert numbers == list(range(1, 6 + existing_adapter))


@pytest.mark.parametrize("existing_adapter", [False, True])
def test_concurrent_different_uploads_get_distinct_numbers(sessions, existing_adapter):
    tenant = _tenant(sessions)
    if existing_adapter:
        with sessions() as s:
            register_version(s, tenant, "ext", _validated("0"))
    results = _in_threads(
        sessions, *[lambda s, d=d: register_version(s, tenant, "ext", _validated(d)) for d in "abc"]
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert all(created for _, created in results)
    assert sorted(v.version for v, _ in results) == [
        1 + existing_adapter,
        2 + existing_adapter,
        3 + existing_adapter,
    ]


def _history(session, version, deployment) -> None:
    session.add(
        ValidationRun(
            deployment_id=deployment.id,
            version_id=version.id,
            validation_set_id=deployment.validation_set_id,
            variant="stable",
            kind="baseline",
            at=0.0,
            engine="test",
            score=1.0,
            scores=[1.0],
            outputs=["x"],
            output_tokens=[1],
            exact_match_rate=1.0,
        )
    )
    session.add(
        DriftCheck(
            deployment_id=deployment.id,
            version_id=version.id,
            variant="all",
            kind="input",
            at=0.0,
            look=1,
            p=0.5,
            q=0.5,
            drifted=False,
        )
    )
    session.commit()


def test_version_with_recorded_history_is_kept_with_a_409_naming_it(session):
    tenant, _ = create_tenant(session, "acme")
    v1, _ = register_version(session, tenant, "ext", _validated("a"))
    v2, _ = register_version(session, tenant, "ext", _validated("b"))
    deployment = set_deployment(session, tenant, "invoice", v1)
    deployment.validation_set = ValidationSet(
        tenant_id=tenant.id, digest="f" * 64, metric="exact_match", items=1, size_bytes=1
    )
    session.commit()
    _history(session, v1, deployment)
    set_deployment(session, tenant, "invoice", v2)  # v1 is no longer served, only remembered
    with pytest.raises(
        Conflict,
        match=r"ext@1 is referred to by its recorded history \(1 validation runs, "
        r"1 drift checks\)",
    ) as refused:
        delete_version(session, tenant, v1)
    assert refused.value.code == "version_has_history"
    assert resolve_version(session, tenant, "ext@1").id == v1.id  # nothing changed
    assert session.scalar(select(func.count()).select_from(ValidationRun)) == 1


def test_version_named_only_by_a_finished_rollout_can_be_deleted(session):
    tenant, _ = create_tenant(session, "acme")
    v1, _ = register_version(session, tenant, "ext", _validated("a"))
    v2, _ = register_version(session, tenant, "ext", _validated("b"))
    deployment = set_deployment(session, tenant, "invoice", v2)
    session.add(
        Rollout(
            deployment_id=deployment.id,
            kind="canary",
            phase="Aborted",
            salt="s",
            created_by="t",
            created_at=0.0,
            finished_at=1.0,
            variants=[
                {
                    "label": "stable",
                    "version_id": v2.id,
                    "digest": v2.digest,
                    "ref": "ext@2",
                    "weight": 100,
                },
                {
                    "label": "candidate",
                    "version_id": v1.id,
                    "digest": v1.digest,
                    "ref": "ext@1",
                    "weight": 0,
                },
            ],
        )
    )
    session.commit()
    delete_version(session, tenant, v1)
    with pytest.raises(NotFound):
        resolve_version(session, tenant, "ext@1")


def test_concurrent_deletes_of_one_version_are_one_200_and_one_404(sessions):
    tenant = _tenant(sessions)
    with sessions() as s:
        register_version(s, tenant, "ext", _validated("a"))

    def delete(s) -> str:
        delete_version(s, tenant, resolve_version(s, tenant, "ext@1"))
        return "deleted"

    results = _in_threads(sessions, delete, delete)
    assert results.count("deleted") == 1
    assert all(r == "deleted" or isinstance(r, NotFound) for r in results), results


def _stored(tmp_path: Path, digest_char: str) -> ValidatedAdapter:
    folder = tmp_path / f"upload-{digest_char}"
    folder.mkdir(exist_ok=True)
    (folder / CONFIG_FILE).write_text("{}")
    (folder / WEIGHTS_FILE).write_bytes(b"weights")
    return ValidatedAdapter(
        path=folder,
        digest=digest_char * 64,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        size_bytes=7,
    )


def test_blob_survives_a_delete_racing_an_identical_upload_of_another_tenant(sessions, tmp_path):
    store = open_store(f"file://{tmp_path / 'adapters'}")
    gateway = SimpleNamespace(store=store)
    acme, globex = _tenant(sessions, "acme"), _tenant(sessions, "globex")
    for round_, char in enumerate("0123456789abcdef" * 2):
        upload = _stored(tmp_path, char)
        with sessions() as s:  # acme's version of D, about to be deleted
            store.put(upload)
            register_version(s, acme, f"a{round_}", upload)

        def delete(s, name=f"a{round_}") -> bool:
            version = resolve_version(s, acme, name)
            delete_version(s, acme, version)
            return _drop_blob_if_unused(gateway, s, version.digest)

        # the route's steps, in order
        def upload_same(s, upload=upload, name=f"g{round_}") -> AdapterVersion:
            return _register_stored(gateway, s, globex, name, upload, store.put(upload))[0]

        removed, version = _in_threads(sessions, delete, upload_same)
        assert not isinstance(removed, Exception) and not isinstance(version, Exception), (
            removed,
            version,
        )
        assert store.exists(version.digest), f"round {round_}: globex's version has no blob"
        with sessions() as s:
            delete_version(s, globex, resolve_version(s, globex, f"g{round_}"))
            assert _drop_blob_if_unused(gateway, s, upload.digest) is True
        assert not store.exists(upload.digest)
        # no trash left
        assert [p.name for p in store.root.iterdir() if p.name.startswith(".")] == []


def test_blob_comes_back_when_a_version_appears_while_it_is_out_of_sight(sessions, tmp_path):
    store = open_store(f"file://{tmp_path / 'adapters'}")
    upload = _stored(tmp_path, "a")
    store.put(upload)
    tenant = _tenant(sessions)

    def version_appears() -> bool:  # another tenant's upload commits between the two looks
        with sessions() as s:
            register_version(s, tenant, "ext", upload)
            return digest_in_use(s, upload.digest)

    assert store.delete(upload.digest, keep=version_appears) is False
    assert store.exists(upload.digest)
    assert store.delete(upload.digest) is True and not store.exists(upload.digest)
