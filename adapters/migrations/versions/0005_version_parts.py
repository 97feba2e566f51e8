"""The parts of the base each adapter version changes (`adapter_versions.parts`: a JSON list of
"language", "connector", "vision").

Nullable: versions uploaded before this revision were refused anywhere but the language model, so
NULL means ["language"]. Added only where it is missing, as in 0002–0004.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if "parts" not in {c["name"] for c in inspector.get_columns("adapter_versions")}:
        op.add_column("adapter_versions", sa.Column("parts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("parts")
