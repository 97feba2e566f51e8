"""The feedback loop: the request log (`requests`), user feedback (`feedback`), captured requests
for retraining (`captures`, opted in per deployment by `deployments.capture`), and each answer's
confidence (mean token log-probability) on rollout samples, drift samples and validation replays.

Only tables and nullable columns are added: rows written before this revision read as "no confidence
recorded", and no deployment captures anything until its tenant opts in. Like 0002, each is added
only where it is missing (an unversioned catalog that `create_all` made is adopted by running every
revision).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("requests"):
        _requests()
    if not inspector.has_table("feedback"):
        _feedback()
    if not inspector.has_table("captures"):
        _captures()
    for table, column, kind in (
        ("deployments", "capture", sa.JSON()),
        ("rollout_samples", "confidence", sa.Double()),
        ("input_samples", "confidence", sa.Double()),
        ("validation_runs", "confidences", sa.JSON()),
    ):
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, sa.Column(column, kind, nullable=True))


def _requests() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_s", sa.Double(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("confidence_mean", sa.Double(), nullable=True),
        sa.Column("confidence_min", sa.Double(), nullable=True),
        sa.Column("captured", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_requests_tenant", "requests", ["tenant_id", "id"])
    op.create_index("ix_requests_at", "requests", ["at"])
    op.create_index("ix_requests_deployment", "requests", ["deployment_id", "at"])


def _feedback() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.Integer(), nullable=True),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
        sa.Column("correction", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("updated_at", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("tenant_id", "request_id"),
    )
    op.create_index("ix_feedback_rollout", "feedback", ["rollout_id"])
    op.create_index("ix_feedback_deployment", "feedback", ["deployment_id", "at"])


def _captures() -> None:
    op.create_table(
        "captures",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("deployment", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=80), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("images", sa.JSON(), nullable=False),
        sa.Column("confidence_mean", sa.Double(), nullable=True),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("request_id"),
    )
    op.create_index("ix_captures_tenant_id", "captures", ["tenant_id"])
    op.create_index("ix_captures_deployment", "captures", ["deployment_id", "id"])
    op.create_index("ix_captures_at", "captures", ["at"])


def downgrade() -> None:
    with op.batch_alter_table("validation_runs") as batch:
        batch.drop_column("confidences")
    for table in ("input_samples", "rollout_samples"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("confidence")
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("capture")
    op.drop_table("captures")
    op.drop_table("feedback")
    op.drop_table("requests")
