"""The engine process: one vLLM OpenAI server as a supervised subprocess on a private loopback port.

Only the gateway talks to it (it holds a random bearer token), so vLLM's runtime LoRA endpoints are never
reachable by clients. The supervisor restarts it when it exits or stops answering; after each start its
`on_ready` hook (given at construction) re-registers the adapters that deployments need.
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

from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.engine.command import engine_command
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

__all__ = ["EngineSupervisor"]

log = logging.getLogger("lorafleet.engine")
_HEALTH_INTERVAL_S = 5.0
_HEALTH_FAILURES_BEFORE_RESTART = 3
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)


def _die_with_parent() -> None:
    """Linux: the engine gets SIGTERM if the gateway dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class EngineSupervisor:
    """Starts the engine, watches it, restarts it; tells `client` when it is up or down."""

    def __init__(self, settings: Settings, client: EngineClient, metrics: Metrics, log_path: Path,
                 hardware: Hardware, quantization: Quantization,
                 on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
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

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="engine-supervisor")

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
            self.client.mark_down()
            await self._terminate()
            delay = _RESTART_BACKOFF_S[min(failures, len(_RESTART_BACKOFF_S) - 1)]
            failures += 1
            self.metrics.engine_restarts.inc()
            log.warning("engine down; restarting in %.0f s (see %s)", delay, self.log_path)
            await asyncio.sleep(delay)

    async def _launch(self) -> bool:
        cmd, env = engine_command(self.settings, self.client.port, self.client.token, self.hardware.gpu is not None,
                                  self.quantization)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as logfile:
            # its own process group: vLLM's engine-core and worker processes go with it (see _terminate)
            self.process = await asyncio.create_subprocess_exec(*cmd, env=env, stdout=logfile, stderr=logfile,
                                                                stdin=asyncio.subprocess.DEVNULL,
                                                                preexec_fn=_die_with_parent, start_new_session=True)
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
                self.client.mark_up()
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
            except TimeoutError:
                misses = 0 if await self.client.healthy() else misses + 1
        log.error("engine failed %d health checks in a row", misses)

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
