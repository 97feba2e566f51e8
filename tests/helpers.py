"""Small helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import uvicorn
from fastapi import APIRouter, FastAPI
from PIL import Image
from sqlalchemy.orm import sessionmaker

from lorafleet.chat_jsonl import image_data_url as data_url
from lorafleet.serve.api.errors import install_error_handlers
from lorafleet.serve.api.guard import Authenticate
from lorafleet.serve.feedback.request_log import LoggedRequest, RequestLog, new_request_id
from lorafleet.serve.gateway_client import pack_adapter
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.route_cache import RouteCache
from lorafleet.serve.usage.prices import NANOS


def image_data_url(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 64)
) -> str:
    return data_url(Image.new("RGB", size, color))


def image_messages(
    text: str = "What is in the image?", color: tuple[int, int, int] = (200, 30, 30)
) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(color)}},
                {"type": "text", "text": text},
            ],
        }
    ]


def upload_archive(http: httpx.Client, name: str, archive: Path) -> httpx.Response:
    with open(archive, "rb") as f:
        return http.post(
            "/v1/adapters", data={"name": name}, files={"file": ("a.tar.gz", f, "application/gzip")}
        )


def upload_folder(http: httpx.Client, name: str, folder: Path) -> dict:
    archive = pack_adapter(folder)
    try:
        response = upload_archive(http, name, archive)
    finally:
        archive.unlink()
    assert response.status_code in (200, 201), response.text
    return response.json()


def assert_openai_error(response: httpx.Response, status: int, phrase: str = "") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert isinstance(error["code"], str), error  # every error has a string code, as OpenAI's
    assert phrase in error["message"], error["message"]
    return error


def poll_until(
    check: Callable[[], object], timeout: float, what: str, every: float = 0.25
) -> object:
    """`check()`'s first truthy result, asked every `every` seconds; AssertionError naming `what`
    after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout} s")


class FakeSleep:
    """A stand-in for `asyncio.sleep` that product code takes as a parameter: each call records
    its delay and returns once the test has moved the fake time past its end (`advance`), so a
    test checks the waits asked for without spending them."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delays: list[float] = []  # every wait asked for, in order
        self._waiting: list[tuple[float, asyncio.Future]] = []

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        wakes = asyncio.get_running_loop().create_future()
        self._waiting.append((self.now + delay, wakes))
        await wakes

    def advance(self, seconds: float) -> None:
        """Move the fake time on: the waits that end by then return."""
        self.now += seconds
        due = [(end, wakes) for end, wakes in self._waiting if end <= self.now]
        for end, wakes in due:
            self._waiting.remove((end, wakes))
            if not wakes.done():
                wakes.set_result(None)


def catalog_app(sessions: sessionmaker, *routers: APIRouter) -> FastAPI:
    """Tenant routes over a real catalog with the gateway's own key check, error handlers and
    request log (never flushed by itself), and no engine: what the routes read from the catalog,
    through HTTP."""
    app = FastAPI()
    app.state.gateway = SimpleNamespace(
        sessions=sessions,
        route_cache=RouteCache(sessions, 0.0),
        request_log=RequestLog(sessions, Metrics(), flush_s=3600),
        controller=SimpleNamespace(gate_progress={}),  # no gate runs here
    )
    app.add_middleware(Authenticate, gateway=app.state.gateway)
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    return app


@contextlib.contextmanager
def on_loopback(app: FastAPI, lifespan: str = "auto") -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port for the block (what the CLI talks to);
    yields its URL. `lifespan="off"`: a gateway app served without starting its engine and
    timers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    poll_until(lambda: server.started, 10, "the API on loopback", every=0.01)  # in-process
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def logged_request(tenant_id: int, **fields: object) -> LoggedRequest:
    """A request-log row: an answered request of deployment `reader` just now (`fields`
    override)."""
    row: dict = dict(
        request_id=new_request_id(),
        tenant_id=tenant_id,
        key_id=None,
        at=time.time(),
        status=200,
        error_code=None,
        prompt_tokens=10,
        completion_tokens=5,
        latency_s=0.1,
        stream=False,
        deployment="reader",
        digest="d" * 64,
    )
    return LoggedRequest(**(row | fields))


def record_usage(gateway, tenant: str, cost: float = 0.0, **fields: object) -> None:
    """One request of `tenant` (`fields`: the row's) with its `cost`, in the gateway's usage and
    written to its catalog."""
    from lorafleet.adapters.tenants import get_tenant

    with gateway.sessions() as session:
        tenant_id = get_tenant(session, tenant).id
    gateway.usage.add(logged_request(tenant_id, **fields), round(cost * NANOS))
    gateway.usage.flush()
