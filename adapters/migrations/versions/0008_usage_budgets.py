"""Usage and budgets: what each tenant's requests used per UTC day (`usage_days`), the admin's
budgets (`budgets`), per-tenant prices (`tenant_policies.prices`, nullable: the defaults), and per
request the images and the engine's prefill and decode times (`requests.images`, `prefill_s`,
`decode_s`; earlier rows: 0 images, times unknown). Each added where it is missing.

Usage before this revision is not rebuilt from the request log: the report starts at the upgrade.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def _request_columns() -> list[sa.Column]:
    return [
        sa.Column("images", sa.Integer(), server_default="0", nullable=False),
        sa.Column("prefill_s", sa.Double(), nullable=True),
        sa.Column("decode_s", sa.Double(), nullable=True),
    ]


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("usage_days"):
        op.create_table(
            "usage_days",
            sa.Column("tenant_id", sa.Integer(), nullable=False),
            sa.Column("day", sa.Date(), nullable=False),
            sa.Column("deployment", sa.String(length=64), nullable=False),
            sa.Column("digest", sa.String(length=64), nullable=False),
            sa.Column("batch", sa.Boolean(), nullable=False),
            sa.Column("failed", sa.Boolean(), nullable=False),
            sa.Column("requests", sa.BigInteger(), nullable=False),
            sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
            sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
            sa.Column("images", sa.BigInteger(), nullable=False),
            sa.Column("prefill_s", sa.Double(), nullable=False),
            sa.Column("decode_s", sa.Double(), nullable=False),
            sa.Column("cost_nanos", sa.BigInteger(), nullable=False),
            sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
            sa.PrimaryKeyConstraint("tenant_id", "day", "deployment", "digest", "batch", "failed"),
        )
    if not inspector.has_table("budgets"):
        op.create_table(
            "budgets",
            sa.Column("tenant_id", sa.Integer(), nullable=False),
            sa.Column("period", sa.String(length=8), nullable=False),
            sa.Column("tokens", sa.BigInteger(), nullable=True),
            sa.Column("cost", sa.Double(), nullable=True),
            sa.Column("alert_at", sa.Double(), nullable=True),
            sa.Column("alerted_for", sa.Date(), nullable=True),
            sa.Column("exceeded_for", sa.Date(), nullable=True),
            sa.Column("updated_at", sa.Double(), nullable=False),
            sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
            sa.PrimaryKeyConstraint("tenant_id", "period"),
        )
    if "prices" not in {c["name"] for c in inspector.get_columns("tenant_policies")}:
        op.add_column("tenant_policies", sa.Column("prices", sa.JSON(), nullable=True))
    present = {c["name"] for c in inspector.get_columns("requests")}
    for column in _request_columns():
        if column.name not in present:
            op.add_column("requests", column)


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        for column in _request_columns():
            batch.drop_column(column.name)
    with op.batch_alter_table("tenant_policies") as batch:
        batch.drop_column("prices")
    op.drop_table("budgets")
    op.drop_table("usage_days")
