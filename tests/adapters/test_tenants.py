"""Tenants' keys, limits, disabling, deletion and the audit trail, on a real SQLite catalog."""

from __future__ import annotations

import threading
import time
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text

from lorafleet.adapters.catalog import (
    AdapterVersion,
    ApiKey,
    Batch,
    BatchLine,
    Budget,
    Decision,
    Deployment,
    Rollout,
    StoredFile,
    Tenant,
    UsageDay,
    ValidationSet,
    open_catalog,
)
from lorafleet.adapters.registry import register_version, set_deployment
from lorafleet.adapters.tenants import (
    authenticate,
    authenticate_key,
    create_tenant,
    delete_tenant,
    get_tenant,
    hash_key,
    list_audit,
    list_keys,
    new_key,
    record_audit,
    revoke_key,
    rotate_key,
    set_disabled,
    set_limits,
    stored_usage,
    touch_keys,
)
from lorafleet.adapters.validate import ValidatedAdapter
from lorafleet.errors import CatalogBehind, Conflict, NotFound, Unauthorized
from tests.old_catalog import schema_statements

PRE_0_1_0_MISSING = ("api_keys", "tenant_policies", "audit_events")  # tables 0.1.0 added


def _validated(char: str, size: int = 10) -> ValidatedAdapter:
    return ValidatedAdapter(
        path=Path("."),
        digest=char * 64,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        size_bytes=size,
    )


@pytest.fixture
def sessions(catalog_url):
    return open_catalog(catalog_url)[1]


def test_a_tenant_has_several_keys_each_revocable_alone(sessions):
    with sessions() as session:
        tenant, first = create_tenant(session, "acme")
        second_row, second = new_key(session, tenant, label="ci")
        assert authenticate(session, first).id == authenticate(session, second).id == tenant.id
        keys = list_keys(session, tenant)
        assert [k.label for k in keys] == ["first", "ci"]
        # only the hash is kept
        assert keys[0].prefix == first[:8] and first not in keys[0].key_hash
        revoke_key(session, tenant, keys[0].id)
        with pytest.raises(Unauthorized, match="revoked") as refused:
            authenticate(session, first)
        assert refused.value.code == "api_key_revoked"
        assert authenticate(session, second).id == tenant.id  # the other key still works


def test_rotation_keeps_the_old_key_for_the_grace_period_only(sessions):
    with sessions() as session:
        tenant, old_secret = create_tenant(session, "acme")
        old_id = list_keys(session, tenant)[0].id
        old, new, new_secret = rotate_key(session, tenant, old_id, grace_s=60)
        assert new_secret != old_secret and new.id != old_id
        assert old.expires_at == pytest.approx(time.time() + 60, abs=5)
        assert authenticate(session, old_secret).id == tenant.id  # within the grace period
        with pytest.raises(Unauthorized, match="expired") as expired:
            authenticate_key(session, old_secret, now=time.time() + 61)
        assert expired.value.code == "api_key_expired"
        assert authenticate_key(session, new_secret, now=time.time() + 61)[0].id == tenant.id
        _, _, now_secret = rotate_key(session, tenant, new.id, grace_s=0)
        with pytest.raises(Unauthorized):
            authenticate(session, new_secret)  # grace 0: replaced at once
        assert authenticate(session, now_secret).id == tenant.id
        with pytest.raises(Conflict):
            # an expired key cannot be rotated again
            rotate_key(session, tenant, new.id, grace_s=10)


def test_a_key_with_an_expiry_stops_at_it(sessions):
    with sessions() as session:
        tenant, _ = create_tenant(session, "acme")
        _, secret = new_key(session, tenant, expires_at=time.time() + 30)
        assert authenticate(session, secret).id == tenant.id
        with pytest.raises(Unauthorized, match="expired"):
            authenticate_key(session, secret, now=time.time() + 31)


def test_a_disabled_tenant_gets_401_with_the_reason_and_comes_back_when_enabled(sessions):
    with sessions() as session:
        tenant, key = create_tenant(session, "acme")
        set_disabled(session, tenant, True, "unpaid invoice")
        with pytest.raises(Unauthorized, match="disabled: unpaid invoice") as refused:
            authenticate(session, key)
        assert refused.value.code == "tenant_disabled"
        set_disabled(session, tenant, False)
        assert authenticate(session, key).id == tenant.id


def test_limits_are_set_and_reset_one_by_one(sessions):
    with sessions() as session:
        tenant, key = create_tenant(session, "acme")
        assert set_limits(session, tenant, {"rpm": 10, "tpm": 0}).limits == {"rpm": 10, "tpm": 0}
        assert set_limits(session, tenant, {"rpm": None, "concurrency": 2}).limits == {
            "tpm": 0,
            "concurrency": 2,
        }
        assert authenticate_key(session, key)[2].limits == {"tpm": 0, "concurrency": 2}


def test_deleting_a_tenant_removes_what_it_owns_and_nothing_of_others(sessions):
    with sessions() as session:
        acme, _ = create_tenant(session, "acme")
        globex, globex_key = create_tenant(session, "globex")
        v1, _ = register_version(session, acme, "m", _validated("a"))
        v2, _ = register_version(session, acme, "m", _validated("b"))
        deployment = set_deployment(session, acme, "prod", v1)
        # the same content as acme's v1
        shared, _ = register_version(session, globex, "m", _validated("a"))
        set_deployment(session, globex, "prod", shared)
        session.add(
            ValidationSet(
                tenant_id=acme.id, digest="c" * 64, metric="exact_match", items=1, size_bytes=1
            )
        )
        rollout = Rollout(
            deployment_id=deployment.id,
            kind="canary",
            phase="Progressing",
            salt="s",
            variants=[],
            created_by="t",
            created_at=time.time(),
        )
        session.add(rollout)
        session.flush()
        session.add(
            Decision(
                deployment_id=deployment.id,
                rollout_id=rollout.id,
                at=time.time(),
                action="start",
                reason="Started",
                message="",
                step_index=0,
                actor="t",
            )
        )
        deployment.rollout_id = rollout.id
        # a file, a batch with a finished line, a day's usage and a budget
        now = time.time()
        session.add(
            StoredFile(
                id="file-1",
                tenant_id=acme.id,
                purpose="batch",
                filename="r.jsonl",
                bytes=1,
                lines=1,
                digest="f" * 64,
                created_at=now,
            )
        )
        session.add(
            Batch(
                id="batch-1",
                tenant_id=acme.id,
                input_file_id="file-1",
                endpoint="/v1/chat/completions",
                completion_window="24h",
                status="in_progress",
                total=1,
                completed=1,
                failed=0,
                created_at=now,
                expires_at=now + 86400,
                lease_until=0.0,
            )
        )
        session.flush()
        session.add(
            BatchLine(
                batch_id="batch-1",
                line=0,
                custom_id="a",
                request_id="r",
                status=200,
                body={},
                at=now,
            )
        )
        session.add(
            UsageDay(
                tenant_id=acme.id,
                day=date(2026, 12, 1),
                deployment="prod",
                digest="a" * 64,
                batch=False,
                failed=False,
                requests=1,
                prompt_tokens=1,
                completion_tokens=1,
                images=0,
                prefill_s=0.0,
                decode_s=0.0,
                cost_nanos=0,
            )
        )
        session.add(Budget(tenant_id=acme.id, period="day", tokens=5, updated_at=now))
        session.commit()

        with pytest.raises(Conflict, match="rollout") as refused:
            delete_tenant(session, acme)
        assert refused.value.code == "rollout_running"
        # refused: nothing removed
        assert session.scalar(select(func.count()).select_from(Deployment)) == 2

        deleted = delete_tenant(session, get_tenant(session, "acme"), force=True)
        assert deleted.adapter_digests == {"a" * 64, "b" * 64} and deleted.validation_digests == {
            "c" * 64
        }
        assert deleted.counts["adapter_versions"] == 2 and deleted.counts["decisions"] == 1
        assert deleted.file_digests == {"f" * 64}
        for table in ("files", "batches", "batch_lines", "usage_days", "budgets"):
            assert deleted.counts[table] == 1, table
        with pytest.raises(NotFound):
            get_tenant(session, "acme")
        assert {v.digest for v in session.scalars(select(AdapterVersion))} == {"a" * 64}  # globex's
        assert authenticate(session, globex_key).name == "globex"
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 1
        assert v2.id not in set(session.scalars(select(AdapterVersion.id)))


def test_stored_usage_counts_versions_and_bytes(sessions):
    with sessions() as session:
        tenant, _ = create_tenant(session, "acme")
        assert stored_usage(session, tenant) == (0, 0)
        register_version(session, tenant, "m", _validated("a", 100))
        register_version(session, tenant, "n", _validated("b", 50))
        assert stored_usage(session, tenant) == (2, 150)


def test_audit_lists_newest_first_per_tenant_with_paging(sessions):
    with sessions() as session:
        for i in range(5):
            record_audit(
                session,
                "admin@127.0.0.1",
                "tenant.limits",
                "acme" if i % 2 == 0 else "globex",
                step=i,
            )
        events = list_audit(session, "acme")
        assert [e.details["step"] for e in events] == [4, 2, 0]
        assert [e.details["step"] for e in list_audit(session, limit=2)] == [4, 3]
        assert [e.details["step"] for e in list_audit(session, before=events[1].id)] == [1, 0]
        assert events[0].actor == "admin@127.0.0.1"


def test_key_use_is_recorded_and_never_moves_back(sessions):
    with sessions() as session:
        tenant, _ = create_tenant(session, "acme")
        key = list_keys(session, tenant)[0]
        touch_keys(session, {key.id: 200.0})
        touch_keys(session, {key.id: 100.0})
        session.refresh(key)
        assert key.last_used_at == 200.0


def test_a_catalog_from_before_api_keys_is_upgraded_when_asked_and_keeps_its_keys(tmp_path):
    """An install made before keys were a table (and before revisions): one key per tenant in
    tenants.key_hash, no api_keys, tenant_policies or audit_events. This release serves it only
    once asked to upgrade it."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    old = [s for s in schema_statements("sqlite") if not any(t in s for t in PRE_0_1_0_MISSING)]
    db = create_engine(url)
    with db.begin() as connection:
        for statement in old:
            connection.exec_driver_sql(statement)
        connection.execute(
            text(
                "INSERT INTO tenants (name, key_hash, sample_inputs, created_at) "
                "VALUES ('old', :h, 1, '2026-01-01 00:00:00')"
            ),
            {"h": hash_key("lf-old-key")},
        )
    db.dispose()
    with pytest.raises(CatalogBehind, match="run `lorafleet db upgrade`"):
        open_catalog(url)  # the new release starts on it, not asked to upgrade
    _, sessions = open_catalog(url, upgrade=True)
    with sessions() as session:
        assert authenticate(session, "lf-old-key").name == "old"
        assert len(list_keys(session, session.scalars(select(Tenant)).one())) == 1
    _, sessions = open_catalog(url)  # and again: at this release's revision, nothing to do
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 1


def test_gateways_opening_one_new_catalog_at_once_all_start(tmp_path):
    """Two gateways started together on a new catalog used to race to create its tables (one
    exited)."""
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    errors: list[Exception] = []

    def start() -> None:
        try:
            open_catalog(url)
        except Exception as exc:  # the failure under test
            errors.append(exc)

    for _ in range(3):  # the race is timing-dependent: a few tries, each on a new file
        url = f"sqlite:///{tmp_path / f'catalog-{len(errors)}-{time.monotonic_ns()}.db'}"
        threads = [threading.Thread(target=start) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
