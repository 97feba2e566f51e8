"""The InferenceObjective each deployment's requests name to an InferencePool
(`deployments.objective`), set by the admin.

Nullable: NULL means the gateway's default (`LORAFLEET_POOL_OBJECTIVE`), as every deployment had
before this revision. Added only where it is missing, as in 0002–0005.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "objective" not in {c["name"] for c in inspector.get_columns("deployments")}:
        op.add_column("deployments", sa.Column("objective", sa.String(253), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("objective")
