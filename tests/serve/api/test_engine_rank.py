"""Deploying an adapter above the engine's max LoRA rank, through the real routes and catalog,
without an engine: a fixed rank gives 409 in OpenAI's shape and changes nothing; a derived rank
grows and the deployment happens."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import httpx
from fastapi import FastAPI

from lorafleet.adapters.catalog import open_catalog
from lorafleet.adapters.registry import create_tenant, register_version
from lorafleet.adapters.validate import ValidatedAdapter
from lorafleet.serve.api import adapters, rollouts
from lorafleet.serve.api.errors import install_error_handlers
from lorafleet.serve.api.guard import Authenticate
from lorafleet.serve.engine.sizing import Workload
from lorafleet.serve.fleet.fleet import EngineReplica, Fleet
from lorafleet.serve.route_cache import RouteCache
from tests.helpers import assert_openai_error
from tests.serve.engine.test_resize import supervisor_for


def _app(tmp_path: Path, catalog: str, **settings) -> tuple[FastAPI, str]:
    """The registry and rollout routes over a real catalog (at URL `catalog`, with no rows) holding
    a rank-8 and a rank-32 version of `ext`."""
    _, sessions = open_catalog(catalog)
    with sessions() as session:
        tenant, key = create_tenant(session, "acme")
        for char, rank in (("a", 8), ("b", 32)):
            register_version(
                session,
                tenant,
                "ext",
                ValidatedAdapter(
                    path=Path("."),
                    digest=char * 64,
                    rank=rank,
                    alpha=16.0,
                    target_modules=("q_proj",),
                    size_bytes=10,
                ),
            )
    supervisor = supervisor_for(tmp_path, Workload(), **settings)  # its engine is not running
    app = FastAPI()
    fleet = Fleet(
        supervisor.settings,
        supervisor.metrics,
        [EngineReplica("engine-0", "supervised", supervisor.client, supervisor)],
    )
    app.state.gateway = SimpleNamespace(
        settings=supervisor.settings,
        sessions=sessions,
        supervisor=supervisor,
        fleet=fleet,
        route_cache=RouteCache(sessions, 0.0),
    )
    app.add_middleware(Authenticate, gateway=app.state.gateway)
    install_error_handlers(app)
    app.include_router(adapters.router)
    app.include_router(rollouts.router)
    return app, key


def _client(app: FastAPI, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"Authorization": f"Bearer {key}"},
    )


async def test_a_fixed_rank_refuses_the_deployment_with_409_and_keeps_the_catalog(
    tmp_path, sqlite_catalog
):
    app, key = _app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"), max_lora_rank=16)
    async with _client(app, key) as http:
        # rank 8 fits
        assert (await http.put("/v1/deployments/d", json={"adapter": "ext@1"})).status_code == 200
        response = await http.put("/v1/deployments/d", json={"adapter": "ext@2"})
        error = assert_openai_error(response, 409, "LORAFLEET_MAX_LORA_RANK")
        assert "rank 32" in error["message"] and "rank 16" in error["message"]
        assert error["code"] == "max_lora_rank_exceeded"
        deployments = (await http.get("/v1/deployments")).json()
    assert [d["adapter"]["version"] for d in deployments] == [1]  # still the rank-8 version
    assert app.state.gateway.supervisor.sizing.max_lora_rank == 16


async def test_a_derived_rank_grows_and_the_deployment_goes_ahead(tmp_path, sqlite_catalog):
    app, key = _app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"))
    supervisor = app.state.gateway.supervisor
    assert supervisor.sizing.max_lora_rank == 16  # nothing deployed yet
    async with _client(app, key) as http:
        response = await http.put("/v1/deployments/d", json={"adapter": "ext@2"})
        assert response.status_code == 200, response.text
        assert response.json()["adapter"]["rank"] == 32
    assert supervisor.sizing.max_lora_rank == 32
    assert "largest deployed rank 32" in supervisor.sizing.max_lora_rank_source
    # the adapters kept in memory are sized again at the new rank
    assert "at rank 32" in supervisor.sizing.max_cpu_loras_source


async def test_rollouts_and_ab_tests_are_refused_like_deployments(tmp_path, sqlite_catalog):
    app, key = _app(tmp_path, sqlite_catalog(tmp_path / "catalog.db"), max_lora_rank=16)
    async with _client(app, key) as http:
        assert (await http.put("/v1/deployments/d", json={"adapter": "ext@1"})).status_code == 200
        canary = await http.post("/v1/deployments/d/rollout", json={"to": "ext@2", "gate": False})
        assert_openai_error(canary, 409, "LORAFLEET_MAX_LORA_RANK")
        ab = await http.post(
            "/v1/deployments/d/ab",
            json={
                "variants": [{"adapter": "ext@1", "weight": 50}, {"adapter": "ext@2", "weight": 50}]
            },
        )
        assert_openai_error(ab, 409, "LORAFLEET_MAX_LORA_RANK")
        assert (await http.get("/v1/rollouts")).json() == []  # neither started
