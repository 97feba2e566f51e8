"""The engine: one vLLM OpenAI server as a supervised subprocess on a private loopback port.

Only the gateway talks to it (it holds a random bearer token), so vLLM's runtime LoRA endpoints are
never reachable by clients. The supervisor restarts it when it exits or stops answering; after each
start the gateway's `on_ready` hook re-registers the adapters that deployments need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx

from .errors import AdapterLoadFailed, EngineUnavailable
from .hardware import Hardware, Quantization
from .metrics import Metrics
from .settings import Settings

__all__ = ["Engine", "engine_command", "free_port", "map_engine_errors"]

log = logging.getLogger("lorafleet.engine")
_HEALTH_INTERVAL_S = 5.0
_HEALTH_FAILURES_BEFORE_RESTART = 3
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def engine_command(settings: Settings, port: int, token: str, cuda: bool,
                   quantization: Quantization) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for these settings, this hardware and quantization."""
    python = settings.engine_python or sys.executable
    # "--api-key=…": a random token may start with "-", which argparse would read as an option
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", settings.base,
           "--served-model-name", "lorafleet-base", "--host", "127.0.0.1", "--port", str(port), f"--api-key={token}",
           "--enable-lora", "--max-lora-rank", str(settings.max_lora_rank), "--max-loras", str(settings.max_loras),
           "--max-cpu-loras", str(settings.max_cpu_loras), "--max-model-len", str(settings.max_model_len),
           "--max-num-seqs", str(settings.max_num_seqs), "--dtype", quantization.dtype or settings.dtype,
           "--disable-uvicorn-access-log", *quantization.engine_args]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if not cuda:  # CPU settings measured in shared/env-notes.md
        cmd += ["--enforce-eager", "--gpu-memory-utilization", str(settings.cpu_memory_fraction)]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.cpu_kvcache_gib)
    return cmd + list(settings.engine_extra_args), env


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Linux: the engine gets SIGTERM if the gateway dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


@contextlib.contextmanager
def map_engine_errors() -> Iterator[None]:
    """Turn transport failures talking to the engine into EngineUnavailable (503 + Retry-After)."""
    try:
        yield
    except httpx.TransportError as exc:
        raise EngineUnavailable(f"the engine did not answer ({type(exc).__name__}); retry shortly") from exc


class Engine:
    """A supervised vLLM server plus the set of adapter digests registered on it."""

    def __init__(self, settings: Settings, metrics: Metrics, log_path: Path, hardware: Hardware,
                 quantization: Quantization, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.hardware = hardware
        self.quantization = quantization
        self.metrics = metrics
        self.log_path = log_path
        self.on_ready = on_ready
        self.port = settings.engine_port or free_port()
        self._token = secrets.token_urlsafe(32)
        self.client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                        headers={"Authorization": f"Bearer {self._token}"},
                                        timeout=httpx.Timeout(600.0, connect=5.0),
                                        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.last_start_s: float | None = None
        self._up = asyncio.Event()
        self._loaded: set[str] = set()
        self._load_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._task: asyncio.Task | None = None

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def require_up(self) -> None:
        if not self.up:
            raise EngineUnavailable("the engine is starting or restarting; retry shortly")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="engine-supervisor")

    async def wait_ready(self, timeout: float) -> None:
        await asyncio.wait_for(self._up.wait(), timeout)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()
        await self.client.aclose()

    async def _supervise(self) -> None:
        failures = 0
        while True:
            started = await self._launch()
            if started:
                failures = 0
                await self._watch()
            self._mark_down()
            await self._terminate()
            delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)]
            failures += 1
            self.metrics.engine_restarts.inc()
            log.warning("engine down; restarting in %.0f s (see %s)", delay, self.log_path)
            await asyncio.sleep(delay)

    async def _launch(self) -> bool:
        cmd, env = engine_command(self.settings, self.port, self._token, self.hardware.gpu is not None,
                                  self.quantization)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as logfile:
            # its own process group: vLLM's engine-core and worker processes go with it (see _terminate)
            self.process = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=logfile, stderr=logfile,
                                                                stdin=asyncio.subprocess.DEVNULL,
                                                                preexec_fn=_die_with_parent, start_new_session=True)
        self.starts += 1
        log.info("engine pid %d starting on 127.0.0.1:%d (log: %s)", self.process.pid, self.port, self.log_path)
        deadline = t0 + self.settings.engine_start_timeout_s
        while time.perf_counter() < deadline:
            if self.process.returncode is not None:
                log.error("engine exited with %s during start (see %s)", self.process.returncode, self.log_path)
                return False
            if await self._healthy():
                self.last_start_s = time.perf_counter() - t0
                self.metrics.engine_start_seconds.set(self.last_start_s)
                log.info("engine ready in %.1f s", self.last_start_s)
                self._loaded.clear()  # a new process knows no adapters
                self._up.set()
                self.metrics.engine_up.set(1)
                if self.on_ready:
                    try:
                        await self.on_ready()
                    except Exception:  # requests load what they need on demand anyway
                        log.exception("re-registering adapters after start failed")
                return True
            await asyncio.sleep(0.5)
        log.error("engine not ready after %.0f s", self.settings.engine_start_timeout_s)
        return False

    async def _watch(self) -> None:
        """Return when the process exits or stops answering health checks."""
        assert self.process is not None
        misses = 0
        while misses < _HEALTH_FAILURES_BEFORE_RESTART:
            try:
                await asyncio.wait_for(self.process.wait(), _HEALTH_INTERVAL_S)
                log.error("engine exited with code %s", self.process.returncode)
                return
            except asyncio.TimeoutError:
                misses = 0 if await self._healthy() else misses + 1
        log.error("engine failed %d health checks in a row", misses)

    async def _healthy(self) -> bool:
        try:
            return (await self.client.get("/health", timeout=5.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def _mark_down(self) -> None:
        self._up.clear()
        self._loaded.clear()
        self.metrics.engine_up.set(0)

    async def _terminate(self) -> None:
        """Stop the engine and every process it started. A crashed API server leaves vLLM's engine-core and
        worker processes running (holding the model's memory), so the whole group is always killed."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except asyncio.TimeoutError:
                pass
        _signal_group(process.pid, signal.SIGKILL)
        if process.returncode is None:
            await process.wait()

    async def ensure_loaded(self, digest: str, path: Path) -> None:
        """Register an adapter on the engine under its digest; one load in flight per digest."""
        if digest in self._loaded:
            return
        async with self._load_locks[digest]:
            if digest in self._loaded:
                return
            self.require_up()
            t0 = time.perf_counter()
            with map_engine_errors():
                response = await self.client.post("/v1/load_lora_adapter",
                                                  json={"lora_name": digest, "lora_path": str(path)})
            if response.status_code != 200 and "already been loaded" not in response.text:
                self.metrics.adapter_loads.labels("failed").inc()
                raise AdapterLoadFailed(f"the engine could not load adapter {digest[:12]}: {response.text[:300]}")
            self.metrics.adapter_loads.labels("ok").inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - t0)
            self._loaded.add(digest)

    async def unload(self, digest: str) -> None:
        """Best effort: forget an adapter (it is only ever unloaded once nothing uses it)."""
        if digest not in self._loaded or not self.up:
            self._loaded.discard(digest)
            return
        with contextlib.suppress(httpx.HTTPError):
            await self.client.post("/v1/unload_lora_adapter", json={"lora_name": digest})
        self._loaded.discard(digest)
