"""A gateway app with a real catalog and store and no engine (it points at a closed port), one per
test module, for the console's fast tests: pages, sessions and CSRF are all the gateway's own
code; only answers that need the engine are absent."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

ADMIN_KEY = "console-test-admin-key"


@pytest.fixture(scope="module")
def console_app(untrained_base: Path, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """One gateway app per test module (its catalog and store real, no engine, its lifespan not
    run): each test makes tenants of its own (`Console.name`), so none sees another's things."""
    from lorafleet.serve.api.app import create_app
    from lorafleet.serve.settings import Settings

    settings = Settings(
        home=tmp_path_factory.mktemp("console-home"),
        admin_key=ADMIN_KEY,
        engine_url="http://127.0.0.1:9",
        base=str(untrained_base),
    )
    return create_app(settings)


@dataclass
class Console:
    http: httpx.AsyncClient  # the gateway, in-process
    admin: httpx.AsyncClient  # its API with the admin key
    base: Path

    def name(self, tenant: str) -> str:
        """A tenant name of this test's own (`tenant` and a random suffix): the module's other
        tests share the gateway."""
        return f"{tenant}-{uuid.uuid4().hex[:8]}"

    async def tenant(self, name: str) -> str:
        created = await self.admin.post("/admin/tenants", json={"name": name})
        assert created.status_code == 201, created.text
        return created.json()["api_key"]

    def api(self, key: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self.http._transport,
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {key}"},
        )


@pytest.fixture
async def console(console_app: FastAPI, untrained_base: Path) -> AsyncIterator[Console]:
    transport = httpx.ASGITransport(app=console_app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as http,
        httpx.AsyncClient(
            transport=transport,
            base_url="http://testserver",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as admin,
    ):
        yield Console(http, admin, untrained_base)


@pytest.fixture
def browser_session(console: Console) -> Callable:
    """Sign in as a browser would (the login form's token, then the posted key); a client holding
    the cookies."""

    async def sign_in(key: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=console.http._transport, base_url="http://testserver")
        form = await client.get("/console/login")
        token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        signed = await client.post(
            "/console/login", data={"csrf": token, "key": key, "next": "/console/deployments"}
        )
        assert signed.status_code == 303, signed.text
        return client

    return sign_in


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)
