"""The engine process: one vLLM OpenAI server as a supervised subprocess on a private loopback port.

Only the gateway talks to it (it holds a random bearer token), so vLLM's runtime LoRA endpoints are
never reachable by clients. The supervisor restarts it when it exits or stops answering, or with a
new sizing when deployments need a larger max LoRA rank (`resize_for`). Each engine that comes up
is warmed up (`EngineClient.warm_up`) before it is marked up, so readiness means a first request is
as fast as the next; then its `on_ready` hook (given at construction) re-registers the adapters
that deployments need.

The engine's state (`EngineSupervisor.state`; in /readyz, /admin/engine and
`lorafleet_engine_state`):

    starting     the first engine process (or one with a new sizing) does not answer yet
                 (attached: not asked yet)
    up           the engine answers; requests are served
    restarting   the engine went down or a start failed; the next start follows a growing back-off
    crash_loop   `_CRASH_LOOP_AFTER` starts in a row failed; starts go on, with back-offs growing
                 to 30 s
    unreachable  an engine this gateway did not start (`engine_url`, an engine node) does not answer
    stopped      the gateway is shutting down

A start fails when the process cannot be run, exits or does not answer within
`engine_start_timeout_s`, or goes down within `_STABLE_UP_S` of answering. An unexpected error
inside supervision is logged with its traceback, counted (`lorafleet_engine_supervision_errors`) and
taken as the engine going down: supervision only ends when the gateway stops it.
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

from lorafleet.errors import Conflict
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.engine.command import engine_command, engine_process_options
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.sizing import EngineSizing, Workload, derive_sizing
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

__all__ = ["EngineSupervisor", "ENGINE_STATES"]

log = logging.getLogger("lorafleet.engine")
_HEALTH_INTERVAL_S = 5.0
_HEALTH_FAILURES_BEFORE_RESTART = 3
_RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
_CRASH_LOOP_AFTER = 3  # failed starts in a row
_STABLE_UP_S = 60.0  # an engine that goes down sooner after answering has not really started
ENGINE_STATES = ("starting", "up", "restarting", "crash_loop", "unreachable", "stopped")


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class EngineSupervisor:
    """Starts the engine, watches it, restarts it; tells `client` when it is up or down."""

    def __init__(
        self,
        settings: Settings,
        client: EngineClient,
        metrics: Metrics,
        log_path: Path,
        hardware: Hardware,
        quantization: Quantization,
        sizing: EngineSizing,
        on_ready: Callable[[], Awaitable[None]] | None = None,
        attached: bool | None = None,
        env: dict[str, str] | None = None,
        back_off_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`attached`: follow an engine this gateway did not start, at `client.url` (default:
        `engine_url` is set); `env`: added to the engine process's environment (a GPU of its
        own); `back_off_sleep`: waits out the back-off before a restart (a test's fake clock)."""
        self.settings = settings  # as configured: 0 where an engine value is derived
        self.attached = bool(settings.engine_url) if attached is None else attached
        self.sizing = sizing  # what the next (or the running) engine process is started with
        self.client = client
        self.metrics = metrics
        self.log_path = log_path
        self.hardware = hardware
        self.quantization = quantization
        self.on_ready = on_ready
        self.env = env or {}
        self._back_off_sleep = back_off_sleep
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0  # engine processes launched
        self.last_start_s: float | None = None
        self.last_warm_up_s: float | None = None  # the last warm-up; None: none answered yet
        self.state = "starting"
        self.failed_starts = 0  # in a row; back to 0 once an engine stays up `_STABLE_UP_S`
        self.last_exit_code: int | None = None  # of the last engine process that exited by itself
        self.last_error: str | None = None  # why the engine last went down or failed to start
        self._up_since: float | None = None  # monotonic time the running engine started answering
        self._task: asyncio.Task | None = None
        self._resized = asyncio.Event()  # set by `resize`: the running process is replaced
        self._set_state("starting")

    async def start(self) -> None:
        # (`lorafleet serve` prints the engine's sizing as it starts)
        self._task = asyncio.create_task(self._supervise(), name="engine-supervisor")

    def status(self) -> dict[str, str | int | None]:
        """The engine's state, failed starts in a row, and why it last went down (for
        /admin/engine)."""
        return {
            "engine_state": self.state,
            "failed_starts": self.failed_starts,
            "last_exit_code": self.last_exit_code,
            "last_error": self.last_error,
        }

    def serves_rank(self, rank: int) -> bool:
        """Whether adapters of this rank load on the engine as sized (an attached engine is taken
        as it is)."""
        return rank <= self.sizing.max_lora_rank or self.attached

    async def resize_for(self, workload: Workload) -> None:
        """Make the engine take `workload`'s largest rank: restart it with a larger max LoRA rank
        when that is derived; refuse (409) when LORAFLEET_MAX_LORA_RANK fixes it."""
        if self.serves_rank(workload.max_rank):
            return
        if self.sizing.rank_is_set:
            raise Conflict(
                f"adapter rank {workload.max_rank} is above the engine's max LoRA rank "
                f"{self.sizing.max_lora_rank}, which LORAFLEET_MAX_LORA_RANK fixes: raise it to "
                f"{workload.max_rank} or more (or unset it to follow the deployed adapters) and "
                "restart the gateway",
                code="max_lora_rank_exceeded",
            )
        await self.resize(
            derive_sizing(self.settings, workload, self.sizing.machine, self.sizing.model)
        )

    async def resize(self, sizing: EngineSizing) -> None:
        """Restart the engine with `sizing`. Returns at once: the engine is down (requests get
        503) until the new process is ready, whose start registers every deployed adapter."""
        log.warning(
            "engine restarting with a new sizing: %s (was max_lora_rank %d)",
            sizing.describe(),
            self.sizing.max_lora_rank,
        )
        self.sizing = sizing
        self.client.mark_down()
        self._resized.set()

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._terminate()
        self._set_state("stopped")
        await self.client.aclose()

    def _set_state(self, state: str) -> None:
        self.state = state
        for name in ENGINE_STATES:  # every state has a series: 1 for the current one
            self.metrics.engine_state.labels(name).set(1 if name == state else 0)

    def _supervision_failed(self, doing: str, exc: Exception) -> None:
        """A bug or an unforeseen failure: say so loudly, and carry on as if the engine went
        down."""
        self.metrics.engine_supervision_errors.inc()
        self.last_error = f"{doing}: {type(exc).__name__}: {exc}"
        log.error(
            "engine supervision failed while %s; the engine counts as down", doing, exc_info=exc
        )

    async def _supervise(self) -> None:
        if self.attached:
            return await self._attach()
        while True:
            self._resized.clear()  # this launch uses the sizing as it is now
            self._up_since = None
            try:
                await self._run_once()
            except Exception as exc:
                self._supervision_failed("running the engine", exc)
            self.client.mark_down()
            try:
                await self._terminate()
            except Exception as exc:
                self._supervision_failed("stopping the engine", exc)
            if self._resized.is_set():  # asked for, not a failure: start the new one now
                self._set_state("starting")
                continue
            await self._back_off()

    async def _run_once(self) -> None:
        """Launch one engine process and watch it until it goes down."""
        if await self._launch():
            self._up_since = time.monotonic()
            await self._watch()

    async def _back_off(self) -> None:
        """Count the failed start (if it was one), show the state, and wait before the next
        start."""
        if self._up_since is None or time.monotonic() - self._up_since < _STABLE_UP_S:
            self.failed_starts += 1
            self.metrics.engine_failed_starts.set(self.failed_starts)
        self._set_state("crash_loop" if self.failed_starts >= _CRASH_LOOP_AFTER else "restarting")
        delay = _RESTART_BACKOFF_S[min(max(self.failed_starts - 1, 0), len(_RESTART_BACKOFF_S) - 1)]
        self.metrics.engine_restarts.inc()
        log.warning(
            "engine down (%s, %d failed starts in a row); restarting in %.0f s (see %s)",
            self.last_error,
            self.failed_starts,
            delay,
            self.log_path,
        )
        await self._back_off_sleep(delay)

    async def _launch(self) -> bool:
        """Start an engine process and wait until it answers; False when it cannot run, exits or
        times out."""
        cmd, env = engine_command(
            self.settings,
            self.client.port,
            self.client.token,
            self.hardware.gpu is not None,
            self.quantization,
            self.sizing,
        )
        env |= self.env
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        try:
            with open(self.log_path, "ab") as logfile:
                self.process = await asyncio.create_subprocess_exec(
                    *cmd,
                    env=env,
                    stdout=logfile,
                    stderr=logfile,
                    stdin=asyncio.subprocess.DEVNULL,
                    **engine_process_options(self.settings),
                )
        except OSError as exc:  # e.g. LORAFLEET_ENGINE_PYTHON names no executable
            self.last_error = f"cannot run {cmd[0]}: {exc}"
            log.error("engine could not be started: %s", self.last_error)
            return False
        self.starts += 1
        log.info(
            "engine pid %d starting on 127.0.0.1:%d (log: %s)",
            self.process.pid,
            self.client.port,
            self.log_path,
        )
        deadline = t0 + self.settings.engine_start_timeout_s
        while time.perf_counter() < deadline:
            if self.process.returncode is not None:
                self._exited(f"exited with {self.process.returncode} during start")
                return False
            if await self.client.healthy():
                self.last_start_s = time.perf_counter() - t0
                self.metrics.engine_start_seconds.set(self.last_start_s)
                log.info("engine ready in %.1f s", self.last_start_s)
                await self._became_ready()
                return True
            await asyncio.sleep(0.5)
        self.last_error = f"not ready after {self.settings.engine_start_timeout_s:.0f} s"
        log.error("engine %s", self.last_error)
        return False

    def _exited(self, what: str) -> None:
        """The engine process ended by itself: keep its exit code."""
        assert self.process is not None
        self.last_exit_code = code = self.process.returncode
        self.metrics.engine_last_exit_code.set(code if code is not None else 0)
        self.last_error = what
        log.error("engine %s (see %s)", what, self.log_path)

    async def _became_ready(self) -> None:
        self.last_warm_up_s = await self.client.warm_up(self.settings.engine_start_timeout_s)
        if self.last_warm_up_s is not None:
            log.info("engine warmed up in %.1f s", self.last_warm_up_s)
        self.client.mark_up()
        self._set_state("up")
        if self.on_ready:
            try:
                await self.on_ready()
            except Exception:  # requests load what they need on demand anyway
                log.exception("registering adapters after the engine came up failed")

    async def _attach(self) -> None:
        """An engine this gateway did not start (`engine_url`, an engine node): follow its
        health, register adapters when it comes (back) up."""
        log.info("attached to the engine at %s", self.client.url)
        while True:
            try:
                delay = _HEALTH_INTERVAL_S if await self._follow_attached() else 0.5
            except Exception as exc:
                self._supervision_failed("checking the attached engine", exc)
                self.client.mark_down()
                self._set_state("unreachable")
                # not every half second: the same error would flood the log
                delay = _HEALTH_INTERVAL_S
            await asyncio.sleep(delay)

    async def _follow_attached(self) -> bool:
        """One health check of the attached engine; True when it answers."""
        healthy = await self.client.healthy()
        if healthy and not self.client.up:
            log.info("engine at %s is up", self.client.url)
            await self._became_ready()
        elif not healthy and self.state != "unreachable":
            self.client.mark_down()
            self._set_state("unreachable")
            log.warning("engine at %s does not answer", self.client.url)
        return healthy

    async def _watch(self) -> None:
        """Return when the process exits, stops answering health checks, or `resize` replaces it."""
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        resized = asyncio.ensure_future(self._resized.wait())
        try:
            misses = 0
            while misses < _HEALTH_FAILURES_BEFORE_RESTART:
                await asyncio.wait(
                    (exited, resized),
                    timeout=_HEALTH_INTERVAL_S,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if resized.done():
                    log.info("stopping engine pid %d for its new sizing", self.process.pid)
                    return
                if exited.done():
                    self._exited(f"exited with code {self.process.returncode}")
                    return
                misses = 0 if await self.client.healthy() else misses + 1
                self._note_stable()
            self.last_error = f"failed {misses} health checks in a row"
            log.error("engine %s", self.last_error)
        finally:
            exited.cancel()
            resized.cancel()

    def _note_stable(self) -> None:
        """An engine up for `_STABLE_UP_S` ends the run of failed starts."""
        if (
            self.failed_starts
            and self._up_since is not None
            and time.monotonic() - self._up_since >= _STABLE_UP_S
        ):
            self.failed_starts = 0
            self.metrics.engine_failed_starts.set(0)

    async def _terminate(self) -> None:
        """Stop the engine and every process it started. A crashed API server leaves vLLM's
        engine-core and worker processes running (holding the model's memory), so the whole group
        is always killed."""
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
