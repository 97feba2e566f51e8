"""The engine process: one vLLM OpenAI server as a supervised subprocess on a private loopback port.

Only the gateway talks to it (it holds a random bearer token), so vLLM's runtime LoRA endpoints are never
reachable by clients. The supervisor restarts it when it exits or stops answering, or with a new sizing when
deployments need a larger max LoRA rank (`fit`); after each start its `on_ready` hook (given at construction)
re-registers the adapters that deployments need.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from lorafleet.adapters.errors import Conflict
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.engine.command import engine_command, engine_process_options
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.sizing import EngineSizing, Workload, derive_sizing
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

__all__ = ["EngineSupervisor"]

log = logging.getLogger("lorafleet.engine")
_HEALTH_INTERVAL_S = 5.0
_HEALTH_FAILURES_BEFORE_RESTART = 3
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class EngineSupervisor:
    """Starts the engine, watches it, restarts it; tells `client` when it is up or down."""

    def __init__(self, settings: Settings, client: EngineClient, metrics: Metrics, log_path: Path,
                 hardware: Hardware, quantization: Quantization, sizing: EngineSizing,
                 on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings  # as configured: 0 where an engine value is derived
        self.sizing = sizing  # what the next (or the running) engine process is started with
        self.client = client
        self.metrics = metrics
        self.log_path = log_path
        self.hardware = hardware
        self.quantization = quantization
        self.on_ready = on_ready
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.last_start_s: float | None = None
        self._task: asyncio.Task | None = None
        self._resized = asyncio.Event()  # set by `resize`: the running process is replaced

    async def start(self) -> None:
        if not self.settings.engine_url:
            log.info("engine: %s", self.sizing.describe())
        self._task = asyncio.create_task(self._supervise(), name="engine-supervisor")

    def serves_rank(self, rank: int) -> bool:
        """Whether adapters of this rank load on the engine as sized (an attached engine is taken as it is)."""
        return rank <= self.sizing.max_lora_rank or bool(self.settings.engine_url)

    async def fit(self, workload: Workload) -> None:
        """Make the engine take `workload`'s largest rank: restart it with a larger max LoRA rank when that is
        derived; refuse (409) when LORAFLEET_MAX_LORA_RANK fixes it."""
        if self.serves_rank(workload.max_rank):
            return
        if self.sizing.rank_is_set:
            raise Conflict(f"adapter rank {workload.max_rank} is above the engine's max LoRA rank "
                           f"{self.sizing.max_lora_rank}, which LORAFLEET_MAX_LORA_RANK fixes: raise it to "
                           f"{workload.max_rank} or more (or unset it to follow the deployed adapters) and restart "
                           "the gateway", code="max_lora_rank_exceeded")
        await self.resize(derive_sizing(self.settings, workload, self.sizing.machine, self.sizing.model))

    async def resize(self, sizing: EngineSizing) -> None:
        """Restart the engine with `sizing`. Returns at once: the engine is down (requests get 503) until the new
        process is ready, whose start registers every deployed adapter."""
        log.warning("engine restarting with a new sizing: %s (was max_lora_rank %d)", sizing.describe(),
                    self.sizing.max_lora_rank)
        self.sizing = sizing
        self.client.mark_down()
        self._resized.set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()
        await self.client.aclose()

    async def _supervise(self) -> None:
        if self.settings.engine_url:
            return await self._attach()
        failures = 0
        while True:
            self._resized.clear()  # this launch uses the sizing as it is now
            started = await self._launch()
            if started:
                failures = 0
                await self._watch()
            self.client.mark_down()
            await self._terminate()
            if self._resized.is_set():  # asked for, not a failure: start the new one now
                continue
            delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)]
            failures += 1
            self.metrics.engine_restarts.inc()
            log.warning("engine down; restarting in %.0f s (see %s)", delay, self.log_path)
            await asyncio.sleep(delay)

    async def _launch(self) -> bool:
        cmd, env = engine_command(self.settings, self.client.port, self.client.token, self.hardware.gpu is not None,
                                  self.quantization, self.sizing)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as logfile:
            self.process = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=logfile, stderr=logfile,
                                                                stdin=asyncio.subprocess.DEVNULL,
                                                                **engine_process_options(self.settings))
        self.starts += 1
        log.info("engine pid %d starting on 127.0.0.1:%d (log: %s)", self.process.pid, self.client.port,
                 self.log_path)
        deadline = t0 + self.settings.engine_start_timeout_s
        while time.perf_counter() < deadline:
            if self.process.returncode is not None:
                log.error("engine exited with %s during start (see %s)", self.process.returncode, self.log_path)
                return False
            if await self.client.healthy():
                self.last_start_s = time.perf_counter() - t0
                self.metrics.engine_start_seconds.set(self.last_start_s)
                log.info("engine ready in %.1f s", self.last_start_s)
                await self._became_ready()
                return True
            await asyncio.sleep(0.5)
        log.error("engine not ready after %.0f s", self.settings.engine_start_timeout_s)
        return False

    async def _became_ready(self) -> None:
        self.client.mark_up()
        if self.on_ready:
            try:
                await self.on_ready()
            except Exception:  # requests load what they need on demand anyway
                log.exception("registering adapters after the engine came up failed")

    async def _attach(self) -> None:
        """An engine this gateway did not start (`engine_url`): follow its health, register adapters when it
        comes (back) up."""
        log.info("attached to the engine at %s", self.client.url)
        while True:
            healthy = await self.client.healthy()
            if healthy and not self.client.up:
                log.info("engine at %s is up", self.client.url)
                await self._became_ready()
            elif not healthy and self.client.up:
                self.client.mark_down()
                log.warning("engine at %s stopped answering", self.client.url)
            await asyncio.sleep(_HEALTH_INTERVAL_S if healthy else 0.5)

    async def _watch(self) -> None:
        """Return when the process exits, stops answering health checks, or `resize` replaces it."""
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        resized = asyncio.ensure_future(self._resized.wait())
        try:
            misses = 0
            while misses < _HEALTH_FAILURES_BEFORE_RESTART:
                await asyncio.wait((exited, resized), timeout=_HEALTH_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED)
                if resized.done():
                    log.info("stopping engine pid %d for its new sizing", self.process.pid)
                    return
                if exited.done():
                    log.error("engine exited with code %s", self.process.returncode)
                    return
                misses = 0 if await self.client.healthy() else misses + 1
            log.error("engine failed %d health checks in a row", misses)
        finally:
            exited.cancel()
            resized.cancel()

    async def _terminate(self) -> None:
        """Stop the engine and every process it started. A crashed API server leaves vLLM's engine-core and
        worker processes running (holding the model's memory), so the whole group is always killed."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 20)
        _signal_group(process.pid, signal.SIGKILL)
        if process.returncode is None:
            await process.wait()
