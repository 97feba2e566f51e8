"""The trainer's manifest on adapter versions (`adapter_versions.manifest`: the `manifest.json`
uploaded beside the adapter, informational) and when each validation replay started
(`validation_runs.started_at`; `at` stays when it ended: scheduled replays are claimed by start
time, and their durations vary).

Only nullable columns are added: versions uploaded before this revision have no manifest, and
replays recorded before it no start time. Like 0002 and 0003, each is added only where it is missing
(an unversioned catalog that `create_all` made is adopted by running every revision).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ADDED: tuple[tuple[str, str, sa.types.TypeEngine], ...] = (
    ("adapter_versions", "manifest", sa.JSON()),
    ("validation_runs", "started_at", sa.Double()),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, column, kind in _ADDED:
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            op.add_column(table, sa.Column(column, kind, nullable=True))


def downgrade() -> None:
    for table, column, _ in reversed(_ADDED):
        with op.batch_alter_table(table) as batch:
            batch.drop_column(column)
