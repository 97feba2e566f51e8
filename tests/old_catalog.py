"""Catalogs as lorafleet 0.1.0 left them: its frozen schema
(tests/adapters/data/catalog-0.1.0.<dialect>.sql), and rows written as 0.1.0 wrote them, in plain
SQL (never through today's models, which may have moved on)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

DATA = Path(__file__).parent / "adapters" / "data"
OLD_KEY = "lf-" + "0ld-key-" * 5  # the tenant's key, as 0.1.0 handed it out


@dataclass(frozen=True)
class OldRows:
    """What `insert_rows` wrote: the names and numbers a test reads back after an upgrade."""

    tenant: str
    key: str
    adapter: str
    digests: tuple[str, str]  # version 1, version 2 (the deployment's stable one)
    deployment: str
    decisions: tuple[str, ...]  # the finished rollout's actions, in order
    drift_checks: int
    validation_runs: int


def schema_statements(dialect: str) -> list[str]:
    """The DDL of 0.1.0's catalog on `dialect` ("sqlite" | "postgresql"), one statement each."""
    text = "\n".join(
        line
        for line in (DATA / f"catalog-0.1.0.{dialect}.sql").read_text().splitlines()
        if not line.startswith("--")
    )
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def create_schema(url: str) -> None:
    """Make the database at `url` a new catalog of lorafleet 0.1.0 (no revision: it had none)."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        for statement in schema_statements(engine.dialect.name):
            connection.exec_driver_sql(statement)
    engine.dispose()


def _table(
    name: str, *columns: str, json: tuple[str, ...] = (), when: tuple[str, ...] = ()
) -> sa.TableClause:
    typed = [sa.column(c, sa.JSON()) for c in json] + [sa.column(c, sa.DateTime()) for c in when]
    return sa.table(name, *(sa.column(c) for c in columns), *typed)


def insert_rows(url: str, digests: tuple[str, str] = ("a" * 64, "b" * 64)) -> OldRows:
    """A tenant with its key, an adapter with two versions, a deployment with a validation set, a
    finished canary rollout with its decisions, a replay and drift looks: what a 0.1.0 install
    holds after some use."""
    from lorafleet.adapters.tenants import hash_key

    engine = sa.create_engine(url)
    created, now = datetime(2026, 1, 5, 9, 30), time.time() - 86400
    decisions = ("start", "gate", "advance", "promote")
    variants = [
        {"label": "stable", "version_id": 1, "digest": digests[0], "ref": "ext@1", "weight": 0.0},
        {"label": "canary", "version_id": 2, "digest": digests[1], "ref": "ext@2", "weight": 100.0},
    ]
    with engine.begin() as c:
        c.execute(
            _table(
                "tenants", "id", "name", "key_hash", "sample_inputs", when=("created_at",)
            ).insert(),
            [
                {
                    "id": 1,
                    "name": "acme",
                    "key_hash": hash_key(OLD_KEY),
                    "sample_inputs": True,
                    "created_at": created,
                }
            ],
        )
        c.execute(
            _table(
                "api_keys",
                "id",
                "tenant_id",
                "key_hash",
                "prefix",
                "label",
                "created_at",
                "expires_at",
                "revoked_at",
                "last_used_at",
            ).insert(),
            [
                {
                    "id": 1,
                    "tenant_id": 1,
                    "key_hash": hash_key(OLD_KEY),
                    "prefix": OLD_KEY[:8],
                    "label": "first",
                    "created_at": now,
                    "expires_at": None,
                    "revoked_at": None,
                    "last_used_at": now,
                }
            ],
        )
        c.execute(
            _table(
                "adapters", "id", "tenant_id", "name", "next_version", when=("created_at",)
            ).insert(),
            [{"id": 1, "tenant_id": 1, "name": "ext", "next_version": 3, "created_at": created}],
        )
        c.execute(
            _table(
                "adapter_versions",
                "id",
                "adapter_id",
                "version",
                "digest",
                "rank",
                "alpha",
                "size_bytes",
                json=("target_modules",),
                when=("created_at",),
            ).insert(),
            [
                {
                    "id": n,
                    "adapter_id": 1,
                    "version": n,
                    "digest": digests[n - 1],
                    "rank": 8,
                    "alpha": 16.0,
                    "size_bytes": 136_300,
                    "target_modules": ["q_proj", "v_proj"],
                    "created_at": created,
                }
                for n in (1, 2)
            ],
        )
        c.execute(
            _table(
                "validation_sets",
                "id",
                "tenant_id",
                "digest",
                "metric",
                "items",
                "size_bytes",
                when=("created_at",),
            ).insert(),
            [
                {
                    "id": 1,
                    "tenant_id": 1,
                    "digest": "c" * 64,
                    "metric": "exact_match",
                    "items": 40,
                    "size_bytes": 20_000,
                    "created_at": created,
                }
            ],
        )
        c.execute(
            _table(
                "deployments",
                "id",
                "tenant_id",
                "name",
                "stable_id",
                "previous_stable_id",
                "rollout_id",
                "validation_set_id",
                "drift_replay_at",
                "drift_look_at",
                json=("answer_format",),
                when=("updated_at",),
            ).insert(),
            [
                {
                    "id": 1,
                    "tenant_id": 1,
                    "name": "invoice",
                    "stable_id": 2,
                    "previous_stable_id": 1,
                    "rollout_id": None,
                    "validation_set_id": 1,
                    "drift_replay_at": 0.0,
                    "drift_look_at": 0.0,
                    "answer_format": None,
                    "updated_at": created,
                }
            ],
        )
        c.execute(
            _table(
                "rollouts",
                "id",
                "deployment_id",
                "kind",
                "phase",
                "reason",
                "message",
                "salt",
                "step_index",
                "looks",
                "step_started_at",
                "last_look_at",
                "last_look_requests",
                "created_by",
                "created_at",
                "finished_at",
                "lease_owner",
                "lease_expires",
                "revision",
                json=("variants", "steps", "params", "gate"),
            ).insert(),
            [
                {
                    "id": 1,
                    "deployment_id": 1,
                    "kind": "canary",
                    "phase": "Promoted",
                    "reason": "Promoted",
                    "message": "every step passed",
                    "salt": "5a17",
                    "variants": variants,
                    "steps": [10.0, 50.0],
                    "step_index": 1,
                    "params": {},
                    "gate": None,
                    "looks": 2,
                    "step_started_at": now,
                    "last_look_at": now,
                    "last_look_requests": 40,
                    "created_by": "tenant:acme",
                    "created_at": now,
                    "finished_at": now + 60,
                    "lease_owner": None,
                    "lease_expires": 0.0,
                    "revision": 5,
                }
            ],
        )
        c.execute(
            _table(
                "decisions",
                "id",
                "deployment_id",
                "rollout_id",
                "at",
                "action",
                "reason",
                "message",
                "step_index",
                "actor",
                json=("numbers",),
            ).insert(),
            [
                {
                    "id": i + 1,
                    "deployment_id": 1,
                    "rollout_id": 1,
                    "at": now + i,
                    "action": action,
                    "reason": "RolloutStarted" if i == 0 else "StepAdvanced",
                    "message": f"decision {i}",
                    "step_index": i - 1,
                    "actor": "controller:gw-1",
                    "numbers": [{"p": 0.5, "n": 40}],
                }
                for i, action in enumerate(decisions)
            ],
        )
        c.execute(
            _table(
                "validation_runs",
                "id",
                "deployment_id",
                "version_id",
                "validation_set_id",
                "variant",
                "kind",
                "at",
                "engine",
                "score",
                "exact_match_rate",
                "changed",
                "message",
                json=("scores", "outputs", "output_tokens", "numbers"),
            ).insert(),
            [
                {
                    "id": 1,
                    "deployment_id": 1,
                    "version_id": 2,
                    "validation_set_id": 1,
                    "variant": "stable",
                    "kind": "baseline",
                    "at": now,
                    "engine": "tiny int4",
                    "score": 0.9,
                    "exact_match_rate": 1.0,
                    "changed": False,
                    "message": "",
                    "scores": [1.0, 0.8],
                    "outputs": ["a", "b"],
                    "output_tokens": [3, 4],
                    "numbers": {},
                }
            ],
        )
        c.execute(
            _table(
                "drift_checks",
                "id",
                "deployment_id",
                "version_id",
                "variant",
                "kind",
                "at",
                "look",
                "p",
                "q",
                "drifted",
                "message",
                json=("numbers",),
            ).insert(),
            [
                {
                    "id": n,
                    "deployment_id": 1,
                    "version_id": 2,
                    "variant": "stable",
                    "kind": kind,
                    "at": now + n,
                    "look": 1,
                    "p": 0.4,
                    "q": 0.4,
                    "drifted": False,
                    "message": "",
                    "numbers": {"mmd": 0.01},
                }
                for n, kind in ((1, "input"), (2, "output"))
            ],
        )
        # ids were given here: move the sequences past them, as 0.1.0's did
        if c.dialect.name == "postgresql":
            for table in (
                "tenants",
                "api_keys",
                "adapters",
                "adapter_versions",
                "validation_sets",
                "deployments",
                "rollouts",
                "decisions",
                "validation_runs",
                "drift_checks",
            ):
                c.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT max(id) FROM {table}))"
                )
    engine.dispose()
    return OldRows(
        tenant="acme",
        key=OLD_KEY,
        adapter="ext",
        digests=digests,
        deployment="invoice",
        decisions=decisions,
        drift_checks=2,
        validation_runs=1,
    )
