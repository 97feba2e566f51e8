"""A stand-in for an InferencePool's gateway (Envoy with the Gateway API Inference Extension's
endpoint picker), for tests only: lorafleet's pool upstream needs a thing that places requests by
its own rule, and no cluster runs here.

It places every request round robin over the endpoints it sees answering, as GIE's reference
picker can; an endpoint that refuses a connection or drops one mid-request leaves the rotation (the
request gets Envoy's 503 "no healthy upstream" text) until its `/health` answers again. It records
what each request carried (path, `model`, the flow-control headers, where it went) and can answer
the next requests with a status of its own (`fail_next`), as a pool with no pod ready (503) or one
shedding under saturation (429) does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from lorafleet.serve.engine.command import free_port

__all__ = ["PoolStandIn", "Placed"]


@dataclass(frozen=True)
class Placed:
    """One request the stand-in received."""

    method: str
    path: str
    model: str | None
    headers: dict[str, str]  # lower-cased names
    endpoint: str | None  # where it went; None: answered by the stand-in itself
    status: int


class PoolStandIn:
    def __init__(self, endpoints: Iterable[str]) -> None:
        self.endpoints = list(endpoints)
        self.live = set(self.endpoints)
        self.placed: list[Placed] = []
        self.fail_next: list[int] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._turn = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-standin", daemon=True)
        self._thread.start()
        self._ready.wait(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=2.0), auto_decompress=False
        )
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        self._health = asyncio.ensure_future(self._revive_forever())

    def close(self) -> None:
        async def stop() -> None:
            self._health.cancel()
            await self._runner.cleanup()
            await self._http.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    def _pick(self) -> str | None:
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[self._turn % len(self.endpoints)]
            self._turn += 1
            if endpoint in self.live:
                return endpoint
        return None

    async def _revive_forever(self) -> None:
        while True:
            for endpoint in set(self.endpoints) - self.live:
                try:
                    async with self._http.get(f"{endpoint}/health") as answer:
                        if answer.status == 200:
                            self.live.add(endpoint)
                except (aiohttp.ClientError, TimeoutError):
                    pass
            await asyncio.sleep(0.3)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        model = None
        if body:
            try:
                model = json.loads(body).get("model")
            except (ValueError, AttributeError):
                pass
        headers = {k.lower(): v for k, v in request.headers.items()}

        def record(endpoint: str | None, status: int) -> None:
            self.placed.append(
                Placed(request.method, request.path, model, headers, endpoint, status)
            )

        if self.fail_next:
            status = self.fail_next.pop(0)
            record(None, status)
            return web.Response(status=status, text="no healthy upstream")
        endpoint = self._pick()
        if endpoint is None:
            record(None, 503)
            return web.Response(status=503, text="no healthy upstream")
        forwarded = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        try:
            upstream = await self._http.request(
                request.method, f"{endpoint}{request.path_qs}", data=body, headers=forwarded
            )
        except (aiohttp.ClientError, TimeoutError):
            self.live.discard(endpoint)
            record(endpoint, 503)
            return web.Response(status=503, text="upstream connect error or disconnect/reset")
        response = web.StreamResponse(status=upstream.status)
        for name in ("Content-Type",):
            if name in upstream.headers:
                response.headers[name] = upstream.headers[name]
        try:
            async for chunk in upstream.content.iter_any():
                if not response.prepared:
                    await response.prepare(request)
                await response.write(chunk)
        except (aiohttp.ClientError, TimeoutError):
            self.live.discard(endpoint)
            if not response.prepared:  # nothing sent yet: Envoy's answer
                record(endpoint, 503)
                return web.Response(status=503, text="upstream reset before headers")
            raise
        finally:
            upstream.release()
        if not response.prepared:
            await response.prepare(request)
        record(endpoint, upstream.status)  # before the answer ends: the client sees it recorded
        await response.write_eof()
        return response
