"""The chat path's catalog snapshots: kept, dropped on every catalog commit, expired for other
gateways' changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.adapters.catalog import Tenant, open_catalog
from lorafleet.adapters.registry import create_tenant, register_version, set_deployment
from lorafleet.adapters.validate import ValidatedAdapter
from lorafleet.errors import NotFound, Unauthorized
from lorafleet.serve.route_cache import RouteCache


def _validated(char: str) -> ValidatedAdapter:
    return ValidatedAdapter(
        path=Path("."),
        digest=char * 64,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj",),
        size_bytes=10,
    )


@pytest.fixture
def catalog(catalog_url):
    _, sessions = open_catalog(catalog_url)
    with sessions() as session:
        tenant, key = create_tenant(session, "acme")
        version, _ = register_version(session, tenant, "ext", _validated("a"))
        set_deployment(session, tenant, "prod", version)
        session.commit()
    return sessions, key


def _redeploy(sessions, char: str) -> None:
    with sessions() as session:
        tenant = session.query(Tenant).one()
        version, _ = register_version(session, tenant, "ext", _validated(char))
        set_deployment(session, tenant, "prod", version)
        session.commit()


def test_a_loaded_route_is_served_from_memory(catalog):
    sessions, key = catalog
    cache = RouteCache(sessions, ttl_s=60)
    assert cache.get(key, "prod") is None
    tenant, deployment = cache.load(key, "prod")
    assert (tenant.name, deployment.name, deployment.stable_digest) == ("acme", "prod", "a" * 64)
    assert cache.get(key, "prod") == (tenant, deployment)


def test_a_commit_in_this_process_drops_every_snapshot(catalog):
    sessions, key = catalog
    cache = RouteCache(sessions, ttl_s=60)
    cache.load(key, "prod")
    _redeploy(sessions, "b")
    assert cache.get(key, "prod") is None
    assert cache.load(key, "prod")[1].stable_digest == "b" * 64


def test_a_commit_that_changed_nothing_keeps_them(catalog):
    sessions, key = catalog
    cache = RouteCache(sessions, ttl_s=60)
    cache.load(key, "prod")
    with sessions() as session:
        session.query(Tenant).all()
        session.commit()
    assert cache.get(key, "prod") is not None


def test_another_gateways_change_shows_after_the_ttl(catalog, catalog_url):
    sessions, key = catalog
    # the other gateway's writes do not reach this process's events
    cache = RouteCache(sessions, ttl_s=0.0)
    _, other = open_catalog(catalog_url)
    cache.load(key, "prod")
    _redeploy(other, "c")
    assert cache.get(key, "prod") is None  # expired at once with ttl 0
    assert cache.load(key, "prod")[1].stable_digest == "c" * 64


def test_failed_lookups_are_not_kept(catalog):
    sessions, key = catalog
    cache = RouteCache(sessions, ttl_s=60)
    with pytest.raises(Unauthorized):
        cache.load(key + "x", "prod")
    with pytest.raises(NotFound):
        cache.load(key, "nope")
    assert cache.get(key + "x", "prod") is None and cache.get(key, "nope") is None


def test_a_read_that_raced_an_invalidation_is_not_kept(catalog):
    sessions, key = catalog
    cache = RouteCache(sessions, ttl_s=60)
    real = cache.sessions

    def racing():  # a commit lands while the snapshot is being read
        cache.invalidate()
        return real()

    cache.sessions = racing  # type: ignore[assignment]
    cache.load(key, "prod")
    assert cache.get(key, "prod") is None
