"""0.1.0 schema: the 14 tables `create_all` made in lorafleet 0.1.0, as it made them (same names,
same order).

A catalog made by 0.1.0 or earlier has no revision: upgrading it runs this revision too, which then
creates only the tables it lacks (catalogs from before 0.1.0 have no `api_keys`, `tenant_policies`,
`audit_events`) and gives each tenant that has no key yet its `tenants.key_hash` as its first key,
so that old keys keep authenticating.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tenants() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("sample_inputs", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("key_hash"),
    )


def _rollout_samples() -> None:
    op.create_table(
        "rollout_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("unit", sa.String(length=16), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("latency_s", sa.Double(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("format_valid", sa.Boolean(), nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_samples_rollout_step", "rollout_samples", ["rollout_id", "step_index"])


def _audit_events() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("action", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_tenant", "audit_events", ["tenant", "id"])


def _adapters() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("next_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
    )
    op.create_index("ix_adapters_tenant_id", "adapters", ["tenant_id"])


def _validation_sets() -> None:
    op.create_table(
        "validation_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("metric", sa.String(length=32), nullable=False),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "digest", "metric"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
    )
    op.create_index("ix_validation_sets_tenant_id", "validation_sets", ["tenant_id"])


def _api_keys() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=True),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.Column("last_used_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.UniqueConstraint("key_hash"),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])


def _tenant_policies() -> None:
    op.create_table(
        "tenant_policies",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("limits", sa.JSON(), nullable=False),
        sa.Column("disabled_at", sa.Double(), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
    )


def _adapter_versions() -> None:
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("adapter_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("alpha", sa.Double(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("adapter_id", "version"),
        sa.ForeignKeyConstraint(["adapter_id"], ["adapters.id"]),
    )
    op.create_index("ix_adapter_versions_adapter_id", "adapter_versions", ["adapter_id"])
    op.create_index("ix_adapter_versions_digest", "adapter_versions", ["digest"])


def _deployments() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("stable_id", sa.Integer(), nullable=False),
        sa.Column("previous_stable_id", sa.Integer(), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("answer_format", sa.JSON(), nullable=True),
        sa.Column("validation_set_id", sa.Integer(), nullable=True),
        sa.Column("drift_replay_at", sa.Double(), nullable=False),
        sa.Column("drift_look_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "name"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.ForeignKeyConstraint(["stable_id"], ["adapter_versions.id"]),
        sa.ForeignKeyConstraint(["previous_stable_id"], ["adapter_versions.id"]),
        sa.ForeignKeyConstraint(["validation_set_id"], ["validation_sets.id"]),
    )
    op.create_index("ix_deployments_tenant_id", "deployments", ["tenant_id"])


def _rollouts() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("salt", sa.String(length=32), nullable=False),
        sa.Column("variants", sa.JSON(), nullable=False),
        sa.Column("steps", sa.JSON(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("gate", sa.JSON(), nullable=True),
        sa.Column("looks", sa.Integer(), nullable=False),
        sa.Column("step_started_at", sa.Double(), nullable=False),
        sa.Column("last_look_at", sa.Double(), nullable=False),
        sa.Column("last_look_requests", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("finished_at", sa.Double(), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_expires", sa.Double(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"]),
    )
    op.create_index("ix_rollouts_deployment_id", "rollouts", ["deployment_id"])


def _validation_runs() -> None:
    op.create_table(
        "validation_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("validation_set_id", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("engine", sa.Text(), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("outputs", sa.JSON(), nullable=False),
        sa.Column("output_tokens", sa.JSON(), nullable=False),
        sa.Column("exact_match_rate", sa.Double(), nullable=False),
        sa.Column("changed", sa.Boolean(), nullable=False),
        sa.Column("numbers", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"]),
        sa.ForeignKeyConstraint(["validation_set_id"], ["validation_sets.id"]),
    )
    op.create_index(
        "ix_runs_deployment_version", "validation_runs", ["deployment_id", "version_id"]
    )


def _input_samples() -> None:
    op.create_table(
        "input_samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("empty", sa.Boolean(), nullable=False),
        sa.Column("format_valid", sa.Boolean(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"]),
    )
    op.create_index("ix_input_samples_deployment", "input_samples", ["deployment_id", "id"])


def _drift_checks() -> None:
    op.create_table(
        "drift_checks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("look", sa.Integer(), nullable=False),
        sa.Column("p", sa.Double(), nullable=False),
        sa.Column("q", sa.Double(), nullable=False),
        sa.Column("drifted", sa.Boolean(), nullable=False),
        sa.Column("numbers", sa.JSON(), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"]),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"]),
    )
    op.create_index("ix_drift_checks_deployment", "drift_checks", ["deployment_id", "kind"])


def _decisions() -> None:
    op.create_table(
        "decisions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=80), nullable=False),
        sa.Column("numbers", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"]),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"]),
    )
    op.create_index("ix_decisions_deployment_id", "decisions", ["deployment_id"])
    op.create_index("ix_decisions_rollout_id", "decisions", ["rollout_id"])


# In 0.1.0's creation order (referenced tables first), so that its DDL and this revision's are one
# and the same.
TABLES: tuple[tuple[str, Callable[[], None]], ...] = (
    ("tenants", _tenants),
    ("rollout_samples", _rollout_samples),
    ("audit_events", _audit_events),
    ("adapters", _adapters),
    ("validation_sets", _validation_sets),
    ("api_keys", _api_keys),
    ("tenant_policies", _tenant_policies),
    ("adapter_versions", _adapter_versions),
    ("deployments", _deployments),
    ("rollouts", _rollouts),
    ("validation_runs", _validation_runs),
    ("input_samples", _input_samples),
    ("drift_checks", _drift_checks),
    ("decisions", _decisions),
)


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    for name, create in TABLES:
        # a catalog made by 0.1.0 or earlier is adopted as it is: nothing is recreated
        if name not in existing:
            create()
    _adopt_first_keys(op.get_bind())


def _adopt_first_keys(connection: sa.Connection) -> None:
    """Catalogs from before `api_keys` kept one key per tenant in `tenants.key_hash`: give each
    tenant without a key that one as its first `api_keys` row (tables as this revision has them,
    not the models of today)."""
    tenants = sa.table(
        "tenants",
        sa.column("id", sa.Integer()),
        sa.column("key_hash", sa.String()),
        sa.column("created_at", sa.DateTime()),
    )
    keys = sa.table(
        "api_keys",
        *(
            sa.column(name)
            for name in (
                "tenant_id",
                "key_hash",
                "prefix",
                "label",
                "created_at",
                "expires_at",
                "revoked_at",
                "last_used_at",
            )
        ),
    )
    keyless = sa.select(tenants).where(tenants.c.id.not_in(sa.select(keys.c.tenant_id)))
    rows = [
        {
            "tenant_id": t.id,
            "key_hash": t.key_hash,
            "prefix": "lf-",
            "label": "first",
            "created_at": t.created_at.replace(tzinfo=t.created_at.tzinfo or UTC).timestamp(),
            "expires_at": None,
            "revoked_at": None,
            "last_used_at": None,
        }
        for t in connection.execute(keyless)
    ]
    if rows:
        connection.execute(keys.insert(), rows)


def downgrade() -> None:
    for name, _ in reversed(TABLES):
        op.drop_table(name)
