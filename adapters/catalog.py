"""The catalog: tenants, adapters, versions and deployments, as SQLAlchemy rows (SQLite by default)."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import JSON, ForeignKey, String, UniqueConstraint, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

__all__ = ["Base", "Tenant", "Adapter", "AdapterVersion", "Deployment", "open_catalog"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of a 256-bit random key
    created_at: Mapped[datetime] = mapped_column(default=_now)


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    next_version: Mapped[int] = mapped_column(default=1)  # version numbers are never reused
    created_at: Mapped[datetime] = mapped_column(default=_now)
    versions: Mapped[list["AdapterVersion"]] = relationship(back_populates="adapter",
                                                            order_by="AdapterVersion.version")


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), index=True)
    version: Mapped[int]
    digest: Mapped[str] = mapped_column(String(64), index=True)
    rank: Mapped[int]
    alpha: Mapped[float]
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=_now)
    adapter: Mapped[Adapter] = relationship(back_populates="versions")


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    stable_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(default=_now, onupdate=_now)
    stable: Mapped[AdapterVersion] = relationship()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def open_catalog(url: str) -> tuple[Engine, sessionmaker]:
    """Connect to the catalog database and create missing tables."""
    if url.startswith("sqlite:///"):
        from pathlib import Path

        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)
