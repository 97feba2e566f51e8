"""The gateway's side of the engine: its private HTTP client, the adapters registered on it, and
what happens when it is not there.

Errors (`lorafleet.errors`; each a ServiceUnavailable, so a client gets 503 + Retry-After):
EngineUnavailable (the engine is starting, restarting, or did not answer) and AdapterLoadFailed
(the engine refused or failed to load an adapter).

One policy for an engine that is down: work that needs an answer now (a chat request, `drift check`,
`ab evaluate`) raises EngineUnavailable; catalog changes that will need an adapter (deploy, rollout
and A/B starts, undo) call `preload`, which registers it now when the engine is up and otherwise
leaves it to the registration that follows every engine start; scheduled work (the rollout gate,
validation replays) waits for the next tick.

What the engine says goes to tenants without the server's paths: `public_engine_message` replaces
every absolute path in an engine error text (vLLM names the adapter's folder when a load fails, and
its tracebacks name its files) with `<path>`.

A new engine process compiles parts of its sampler on the first request that needs them (vLLM's
log-probability gather takes seconds on a CPU): `warm_up` sends that request, an image and a text
with log-probabilities as the gateway asks for them, before the engine is marked up, so the first
tenant's request is as fast as the tenth.

An InferencePool (llm-d, the Gateway API Inference Extension) is one such client too
(`pool=Objectives(...)`): it places each request on a pod itself, whose resolver loads the adapter
the request names, so the gateway never asks it to load, unload or warm anything; it is told who
each request is for (`flow_headers`), and its health is that its address answers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import io
import json
import logging
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import httpx
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.store import AdapterStore
from lorafleet.errors import (
    AdapterLoadFailed,
    EngineUnavailable,
    LorafleetError,
    code_for_status,
)
from lorafleet.serve.engine.command import SERVED_BASE_NAME, free_port
from lorafleet.serve.engine.residency import Residency
from lorafleet.serve.metrics import Metrics

__all__ = [
    "EngineClient",
    "Engines",
    "Objectives",
    "FAIRNESS_HEADERS",
    "OBJECTIVE_HEADERS",
    "map_engine_errors",
    "public_engine_message",
]

# What an InferencePool's endpoint picker reads for flow control, under the Gateway API Inference
# Extension's names and llm-d's (since its 0.8): each reads its own, the other passes through.
FAIRNESS_HEADERS = ("x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id")
OBJECTIVE_HEADERS = ("x-gateway-inference-objective", "x-llm-d-inference-objective")


@dataclass(frozen=True)
class Objectives:
    """The InferenceObjectives a pool is told: of live requests (where the deployment names none)
    and of replays; empty: none (the pool's default priority)."""

    live: str = ""
    replay: str = ""


_KEEPALIVE_S = 3.0
log = logging.getLogger("lorafleet.engine")
_PLACEHOLDER = "<path>"
# /a/b or deeper, but not a URL's path (after a host name or "//") unless a file URL; Windows: C:\a
# or C:/a
_POSIX_PATH = r"(?:file://|(?<![\w.~/-]))(?:/[\w.~+@%-]+){2,}/?"
_WINDOWS_PATH = r"(?<!\w)[A-Za-z]:(?:[\\/]+[^\\/\s\"'<>|:*?,;]+)+"
_REST_OF_PATH = r"[^\s\"'`,;()\[\]<>]*"  # after a known folder: up to the end of its path


@functools.lru_cache(maxsize=8)
def _path_pattern(private: tuple[str, ...]) -> re.Pattern[str]:
    known = [re.escape(root) + _REST_OF_PATH for root in sorted(private, key=len, reverse=True)]
    return re.compile("|".join([*known, _POSIX_PATH, _WINDOWS_PATH]))


def public_engine_message(text: str, private: Iterable[str] = ()) -> str:
    """`text` with every absolute filesystem path replaced by `<path>`; paths under the `private`
    folders (home, store, base model) are found by those folders' names, so even with a space in
    them."""
    return _path_pattern(tuple(private)).sub(_PLACEHOLDER, text)


def _scrubbed(value: Any, private: tuple[str, ...]) -> Any:
    if isinstance(value, str):
        return public_engine_message(value, private)
    if isinstance(value, list):
        return [_scrubbed(item, private) for item in value]
    if isinstance(value, dict):
        return {key: _scrubbed(item, private) for key, item in value.items()}
    return value


def _local_folders(paths: Iterable[str | Path]) -> tuple[str, ...]:
    """The absolute forms, as given and resolved, of those `paths` that are folders here (a hub
    id is not)."""
    folders: set[str] = set()
    for path in map(Path, paths):
        if path.is_dir():
            folders |= {
                str(p) for p in (path, path.resolve()) if p.is_absolute() and p != Path(p.anchor)
            }
    return tuple(sorted(folders))


@contextlib.contextmanager
def map_engine_errors() -> Iterator[None]:
    """Turn transport failures talking to the engine into EngineUnavailable (503 + Retry-After)."""
    try:
        yield
    except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
        raise EngineUnavailable(
            f"the engine did not answer ({type(exc).__name__}); retry shortly"
        ) from exc


class Engines(Protocol):
    """What replays and scheduled work need of the engines: one `EngineClient`, or a
    `lorafleet.serve.fleet.Fleet`."""

    @property
    def up(self) -> bool: ...

    @property
    def generation(self) -> int: ...

    def require_up(self) -> None: ...

    async def version(self) -> str: ...

    def client_for(self, digest: str) -> EngineClient: ...


class EngineClient:
    """The engine's private address and bearer token, whether it is up, and the adapter digests
    it knows."""

    def __init__(
        self,
        store: AdapterStore,
        metrics: Metrics,
        port: int = 0,
        url: str = "",
        token: str = "",
        private_paths: Iterable[str | Path] = (),
        by_digest: bool = False,
        pool: Objectives | None = None,
    ) -> None:
        """A supervised engine on a private loopback `port`, or one already running at `url` with
        its `token`; `private_paths` (the gateway's home, the base model) never appear in what
        tenants are told. `by_digest`: an engine node (`lorafleet engine`), which finds adapters
        in the store itself (its resolver) and cannot read this gateway's folders, so it is asked
        for a digest and never handed a path. `pool`: an InferencePool in front of such nodes,
        which places requests itself (its objectives)."""
        self.store = store
        self.pool = pool
        self.by_digest = by_digest or pool is not None
        self.private_paths = _local_folders([*private_paths, store.local_path("_").parent])
        self.metrics = metrics
        self.port = port or free_port()
        self.url = url.rstrip("/") or f"http://127.0.0.1:{self.port}"
        self.token = token or secrets.token_urlsafe(32)
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=httpx.Timeout(600.0, connect=5.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )
        self._chat: aiohttp.ClientSession | None = None
        # engine processes that became ready: a new one may serve a changed base
        self.generation = 0
        # adapter -> the engine start (generation) it was seen to change picture answers in
        self._reaches_pictures: dict[str, int] = {}
        self._up = asyncio.Event()
        self._loaded: set[str] = set()
        # which of them are in the engine's memory and GPU slots (its replica sets the sizes and
        # the name); until then every registered adapter counts as in memory
        self.name = "engine-0"
        self.residency = Residency(cpu_capacity=1 << 30, gpu_capacity=1 << 30)
        self._load_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # where evictions (told in worker threads) are handled
        self._loop: asyncio.AbstractEventLoop | None = None
        # referenced until done (the loop keeps only weak references)
        self._unloads: set[asyncio.Task] = set()
        if not self.by_digest:  # a node's copies are its own cache's
            store.on_evict(self._evicted)

    @property
    def up(self) -> bool:
        return self._up.is_set()

    @property
    def loaded(self) -> AbstractSet[str]:
        """The digests this gateway registered on the engine since it (re)started (read it, do
        not keep it)."""
        return self._loaded

    def client_for(self, digest: str) -> EngineClient:
        """The engine that replays adapter `digest` (as `Fleet.client_for`; one engine is a fleet
        of one)."""
        return self

    def require_up(self) -> None:
        if not self.up:
            raise EngineUnavailable("the engine is starting or restarting; retry shortly")

    def mark_up(self) -> None:
        """A new engine process answers: it knows no adapters yet."""
        self._loaded.clear()
        self.residency.clear()
        self.generation += 1
        self._up.set()
        self.metrics.engine_up.set(1)

    def mark_down(self) -> None:
        self._up.clear()
        self._loaded.clear()
        self.residency.clear()
        self.metrics.engine_up.set(0)

    def public_error(self, raw: bytes, status: int) -> bytes:
        """An engine error answer of HTTP `status` in OpenAI's shape, as the gateway's own errors
        are (a string `code`, an OpenAI `type`), without server paths, for a tenant. vLLM gives
        its exception's name as the type and the status as an integer code."""
        try:
            error = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            error = raw.decode(errors="replace")
        if not isinstance(error, dict):
            error = {"message": error}
        code = error.get("code")
        public = {
            "message": public_engine_message(
                str(error.get("message") or raw.decode(errors="replace")), self.private_paths
            ),
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": _scrubbed(error.get("param"), self.private_paths),
            "code": code if isinstance(code, str) else code_for_status(status, "engine_error"),
        }
        return json.dumps({"error": public}).encode()

    def _error_text(self, response: httpx.Response) -> str:
        """The message of an engine error answer (its text when it is not OpenAI-shaped), without
        paths."""
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        return public_engine_message(str(message), self.private_paths)[:300]

    def flow_headers(
        self, tenant: str, objective: str | None = None, replay: bool = False
    ) -> dict[str, str]:
        """Who a request is for, as a pool's flow control reads it: the tenant (requests of one
        tenant share its fair share) and the InferenceObjective (its priority): `objective`, else
        the pool's default for live requests or replays. Nothing for lorafleet's own engines."""
        if self.pool is None:
            return {}
        headers = dict.fromkeys(FAIRNESS_HEADERS, tenant) if tenant else {}
        if objective := objective or (self.pool.replay if replay else self.pool.live):
            headers |= dict.fromkeys(OBJECTIVE_HEADERS, objective)
        return headers

    async def post_chat(
        self, body: bytes, request_id: str = "", headers: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """POST a chat completion (JSON bytes); the caller reads and releases the response. vLLM
        names the completion `chatcmpl-<request_id>` when one is given.

        The chat path alone goes through aiohttp: per request its pool and C parser cost a
        fraction of the CPU of httpx's (loadtests/bench_gateway_overhead.py), which is the
        gateway's largest own cost."""
        if self._chat is None:  # created on first use: it belongs to the running event loop
            self._chat = aiohttp.ClientSession(
                self.url,
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Content-Type": "application/json",
                },
                # idle connections are dropped before vLLM's uvicorn closes them
                # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s): a request sent on a connection the server is
                # closing fails without an answer
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0),
                auto_decompress=False,
                read_bufsize=2**20,
            )  # an SSE line may be long (logprobs)
        headers = {**(headers or {}), **({"X-Request-Id": request_id} if request_id else {})}
        try:
            return await self._chat.post("/v1/chat/completions", data=body, headers=headers)
        # closed under us before any answer: not processed, send it again
        except aiohttp.ServerDisconnectedError:
            return await self._chat.post("/v1/chat/completions", data=body, headers=headers)

    async def healthy(self) -> bool:
        """The engine answers `/health`; a pool's gateway answers at all (it may route no such
        path to a pod, or pass on one pod's failure: each request finds its own pod)."""
        try:
            status = (await self.http.get("/health", timeout=5.0)).status_code
        except httpx.HTTPError:
            return False
        return self.pool is not None or status == 200

    async def warm_up(self, timeout_s: float) -> float | None:
        """Ask the base for two tokens about a small image, with log-probabilities, so the
        engine compiles what a first request would; the seconds it took, None when the engine
        did not answer 200 within `timeout_s` (requests are served anyway, the first one slower).
        A pool's pods are warmed by their own start, not through it."""
        if self.pool is not None:
            return None
        body = _picture_question(SERVED_BASE_NAME, max_tokens=2)
        t0 = time.perf_counter()
        try:
            response = await self.http.post("/v1/chat/completions", json=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            log.warning("warming the engine up failed: %s", exc)
            return None
        if response.status_code != 200:
            log.warning("warming the engine up failed: %s", self._error_text(response))
            return None
        return time.perf_counter() - t0

    async def reaches_pictures(self, digest: str) -> bool:
        """Whether adapter `digest` (registered) changes the engine's answer about a picture: the
        first token's top log-probabilities, through it and through the base. An adapter on the
        vision tower or connector does not on an engine without vLLM's tower and connector LoRA,
        which loads it and silently answers as the base. Asked once per adapter and engine
        start."""
        if self._reaches_pictures.get(digest) == self.generation:
            return True
        answers = []
        for model in (SERVED_BASE_NAME, digest):
            body = _picture_question(model, max_tokens=1) | {"top_logprobs": 5}
            with map_engine_errors():
                response = await self.http.post("/v1/chat/completions", json=body, timeout=120)
            if response.status_code != 200:
                raise EngineUnavailable(
                    f"the engine did not answer a picture question: {self._error_text(response)}"
                )
            answers.append(response.json()["choices"][0]["logprobs"])
        if answers[0] == answers[1]:
            return False
        self._reaches_pictures[digest] = self.generation
        return True

    async def version(self) -> str:
        """vLLM's version as the engine reports it, "?" when it cannot say."""
        try:
            return str((await self.http.get("/version")).json().get("version", "?"))
        except (httpx.HTTPError, ValueError, AttributeError):
            return "?"

    async def ensure_loaded(self, digest: str) -> None:
        """Register an adapter on the engine under its digest (by path from the store's local
        copy, or by digest on a node); one load in flight per digest. Every call is a use of the
        adapter on this engine, as the request or replay that follows (`residency`). A pool
        loads what its requests name where it places them: nothing is asked of it here."""
        if self.pool is not None:
            self.require_up()
            return
        if digest in self._loaded:
            if not self.by_digest:
                self.store.touch(digest)
            self._used(digest)
            return
        async with self._load_locks[digest]:
            if digest in self._loaded:
                return
            self.require_up()
            self._loop = asyncio.get_running_loop()
            t0 = time.perf_counter()
            if self.by_digest:
                response = await self._resolve_on_node(digest)
            else:
                response = await self._load_by_path(digest)
            if response.status_code != 200 and "already been loaded" not in response.text:
                self.metrics.adapter_loads.labels("failed").inc()
                raise AdapterLoadFailed(
                    f"the engine could not load adapter {digest[:12]}: {self._error_text(response)}"
                )
            self.metrics.adapter_loads.labels("ok").inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - t0)
            self._loaded.add(digest)
            self._used(digest, registering=True)

    def _used(self, digest: str, registering: bool = False) -> None:
        """One use of a registered adapter in the engine's caches: a registered one that had
        left the engine's memory is read from disk again first (a cold load), and whatever its
        coming in pushed out is counted."""
        touch = self.residency.touch(digest)
        if touch.cold and not registering:
            self.metrics.adapter_cold_loads.labels(self.name).inc()
        for tier, evicted in (("cpu", touch.evicted_cpu), ("gpu", touch.evicted_gpu)):
            if evicted:
                self.metrics.adapter_evictions.labels(self.name, tier).inc(len(evicted))

    async def _load_by_path(self, digest: str) -> httpx.Response:
        """vLLM's runtime load of the store's local copy (fetched first, off the event loop)."""
        with self.store.pinned(digest):  # the local copy stays until the engine has read it
            try:
                path = str(await run_in_threadpool(self.store.fetch, digest))
            except LorafleetError:  # the store is unreachable, or its copy is corrupt (discarded)
                self.metrics.adapter_loads.labels("failed").inc()
                raise
            with map_engine_errors():
                return await self.http.post(
                    "/v1/load_lora_adapter", json={"lora_name": digest, "lora_path": path}
                )

    async def _resolve_on_node(self, digest: str) -> httpx.Response:
        """A node loads an adapter the first time a request names it (its resolver fetches it
        from the store); `/tokenize` names it without generating anything: 404 when the store has
        no such digest, 400 when its files do not load."""
        with map_engine_errors():
            return await self.http.post("/tokenize", json={"model": digest, "prompt": "."})

    def _evicted(self, digest: str) -> None:
        """The store's local cache removed the adapter's files (in a worker thread): the engine
        may read them again, so forget the digest; the next request fetches and registers it
        afresh."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._forget, digest)

    def _forget(self, digest: str) -> None:
        self._loaded.discard(digest)
        self.residency.forget(digest)
        task = asyncio.get_running_loop().create_task(self._unload_evicted(digest))
        self._unloads.add(task)
        task.add_done_callback(self._unloads.discard)

    async def _unload_evicted(self, digest: str) -> None:
        """Best effort: the engine drops the name of an adapter whose files are gone, unless it
        was loaded again."""
        async with self._load_locks[digest]:
            if digest in self._loaded or not self.up:
                return
            with contextlib.suppress(httpx.HTTPError):
                await self.http.post("/v1/unload_lora_adapter", json={"lora_name": digest})

    async def preload(self, digests: Iterable[str]) -> None:
        """Register adapters a catalog change is about to use, before it commits (a failed load
        changes nothing). With the engine down they are registered after its next start instead."""
        if self.up:
            for digest in digests:
                await self.ensure_loaded(digest)

    async def unload(self, digest: str) -> None:
        """Best effort: forget an adapter (it is only ever unloaded once nothing uses it; a
        pool's pods drop it from their caches when it is no longer asked for)."""
        self.residency.forget(digest)
        if digest not in self._loaded or not self.up:
            self._loaded.discard(digest)
            return
        with contextlib.suppress(httpx.HTTPError):
            await self.http.post("/v1/unload_lora_adapter", json={"lora_name": digest})
        self._loaded.discard(digest)

    async def aclose(self) -> None:
        await self.http.aclose()
        if self._chat is not None:
            await self._chat.close()


def _picture_question(model: str, max_tokens: int) -> dict[str, Any]:
    """A greedy question about a small picture, with log-probabilities."""
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _warm_up_image()}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": True,
    }


@functools.cache
def _warm_up_image() -> str:
    """A 64x64 grey PNG as a data URL."""
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(png, format="PNG")
    return "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
