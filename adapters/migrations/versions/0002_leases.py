"""Leases (`lorafleet.adapters.leases`: a job runs once at a time across gateways) and the index
ix_drift_checks_at on drift_checks(at)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A catalog made by an unreleased main after 0.1.0 (create_all at start) may have either already
    # (as the models made them): each is created only where it is missing
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("leases"):
        op.create_table(
            "leases",
            sa.Column("name", sa.String(length=64), nullable=False),
            sa.Column("owner", sa.String(length=64), nullable=False),
            sa.Column("expires_at", sa.Double(), nullable=False),
            sa.Column("last_run_at", sa.Double(), nullable=False),
            sa.PrimaryKeyConstraint("name"),
        )
    if "ix_drift_checks_at" not in {
        index["name"] for index in inspector.get_indexes("drift_checks")
    }:
        op.create_index("ix_drift_checks_at", "drift_checks", ["at"])


def downgrade() -> None:
    op.drop_index("ix_drift_checks_at", table_name="drift_checks")
    op.drop_table("leases")
