"""A real catalog (SQLite and PostgreSQL) with one tenant's deployment, and a real capture store
folder."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.orm import sessionmaker

from lorafleet.adapters.catalog import Adapter, AdapterVersion, Deployment, Tenant, open_catalog
from lorafleet.adapters.store import BlobStore

POLICY = {"sample_rate": 1.0, "max_per_day": 1000, "retention_days": 30.0}


@pytest.fixture
def sessions(catalog_url: str) -> Iterator[sessionmaker]:
    engine, made = open_catalog(catalog_url)
    yield made
    engine.dispose()


@pytest.fixture
def images(tmp_path: Path) -> BlobStore:
    """The capture store as a gateway opens it beside a file:// adapter store."""
    return BlobStore(tmp_path / "captures", "")


@dataclass(frozen=True)
class Place:
    """A tenant's deployment: what a capture belongs to."""

    tenant_id: int
    deployment_id: int
    deployment: str
    digest: str


@pytest.fixture
def place(sessions: sessionmaker) -> Callable[..., Place]:
    """Factory: a tenant (made on first use of its name) with a deployment serving one adapter
    version."""

    def make(
        tenant: str = "acme", deployment: str = "invoice", policy: dict | None = POLICY
    ) -> Place:
        with sessions() as s:
            t = s.query(Tenant).filter_by(name=tenant).one_or_none()
            if t is None:
                t = Tenant(name=tenant, key_hash=hashlib.sha256(tenant.encode()).hexdigest())
                s.add(t)
                s.flush()
            adapter = Adapter(tenant_id=t.id, name=f"ext-{deployment}")
            digest = hashlib.sha256(f"{tenant}/{deployment}".encode()).hexdigest()
            version = AdapterVersion(
                adapter=adapter,
                version=1,
                digest=digest,
                rank=8,
                alpha=16.0,
                target_modules=["q_proj"],
                size_bytes=10,
            )
            s.add_all([adapter, version])
            s.flush()
            row = Deployment(tenant_id=t.id, name=deployment, stable_id=version.id, capture=policy)
            s.add(row)
            s.commit()
            return Place(t.id, row.id, deployment, digest)

    return make
