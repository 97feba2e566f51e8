"""OpenAI's Files and Batch APIs: a tenant's files (`files`), its batches (`batches`), the
finished lines of running batches (`batch_lines`), and which request-log rows are a batch's lines
(`requests.batch_id`, nullable: every earlier row was a live request). Each added where it is
missing."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table("files"):
        op.create_table(
            "files",
            sa.Column("id", sa.String(length=40), nullable=False),
            sa.Column("tenant_id", sa.Integer(), nullable=False),
            sa.Column("purpose", sa.String(length=16), nullable=False),
            sa.Column("filename", sa.String(length=255), nullable=False),
            sa.Column("bytes", sa.Integer(), nullable=False),
            sa.Column("lines", sa.Integer(), nullable=False),
            sa.Column("digest", sa.String(length=64), nullable=False),
            sa.Column("created_at", sa.Double(), nullable=False),
            sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_files_tenant", "files", ["tenant_id", "created_at"])
    if not inspector.has_table("batches"):
        stamps = (
            "in_progress_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelling_at",
            "cancelled_at",
        )
        op.create_table(
            "batches",
            sa.Column("id", sa.String(length=40), nullable=False),
            sa.Column("tenant_id", sa.Integer(), nullable=False),
            sa.Column("input_file_id", sa.String(length=40), nullable=False),
            sa.Column("endpoint", sa.String(length=64), nullable=False),
            sa.Column("completion_window", sa.String(length=8), nullable=False),
            sa.Column("status", sa.String(length=16), nullable=False),
            sa.Column("metadata", sa.JSON(), nullable=True),
            sa.Column("errors", sa.JSON(), nullable=True),
            sa.Column("total", sa.Integer(), nullable=False),
            sa.Column("completed", sa.Integer(), nullable=False),
            sa.Column("failed", sa.Integer(), nullable=False),
            sa.Column("output_file_id", sa.String(length=40), nullable=True),
            sa.Column("error_file_id", sa.String(length=40), nullable=True),
            sa.Column("created_at", sa.Double(), nullable=False),
            sa.Column("expires_at", sa.Double(), nullable=False),
            *(sa.Column(stamp, sa.Double(), nullable=True) for stamp in stamps),
            sa.Column("owner", sa.String(length=64), nullable=True),
            sa.Column("lease_until", sa.Double(), nullable=False),
            sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"]),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_batches_tenant", "batches", ["tenant_id", "created_at"])
        op.create_index("ix_batches_status", "batches", ["status"])
    if "batch_id" not in {c["name"] for c in inspector.get_columns("requests")}:
        op.add_column("requests", sa.Column("batch_id", sa.String(length=40), nullable=True))
    if not inspector.has_table("batch_lines"):
        op.create_table(
            "batch_lines",
            sa.Column("batch_id", sa.String(length=40), nullable=False),
            sa.Column("line", sa.Integer(), nullable=False),
            sa.Column("custom_id", sa.String(length=512), nullable=False),
            sa.Column("request_id", sa.String(length=64), nullable=False),
            sa.Column("status", sa.Integer(), nullable=False),
            sa.Column("body", sa.JSON(), nullable=False),
            sa.Column("at", sa.Double(), nullable=False),
            sa.ForeignKeyConstraint(["batch_id"], ["batches.id"]),
            sa.PrimaryKeyConstraint("batch_id", "line"),
        )


def downgrade() -> None:
    with op.batch_alter_table("requests") as batch:
        batch.drop_column("batch_id")
    op.drop_table("batch_lines")
    op.drop_index("ix_batches_status", table_name="batches")
    op.drop_index("ix_batches_tenant", table_name="batches")
    op.drop_table("batches")
    op.drop_index("ix_files_tenant", table_name="files")
    op.drop_table("files")
