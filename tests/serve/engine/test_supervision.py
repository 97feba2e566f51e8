"""Supervision survives every failure: an engine that cannot run or exits at once, an error
inside the loop, an attached engine that is gone. No vLLM: the "engine" is a small script (a real
process) or a missing path."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from lorafleet.adapters.store import LocalStore
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.engine.command import free_port
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.sizing import GIB, Machine, ModelShape, Workload, derive_sizing
from lorafleet.serve.engine.supervisor import EngineSupervisor
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings
from tests.helpers import FakeSleep

MACHINE = Machine(ram_bytes=24 * GIB, cpus=2)
SHAPE = ModelShape(lora_features=4096, kv_bytes_per_token=1024, dtype_bytes=4)


def engine_script(tmp_path: Path, body: str) -> Path:
    """An executable standing in for the engine's python: it gets vLLM's arguments and runs
    `body`."""
    script = tmp_path / "engine-python"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def supervisor_for(
    tmp_path: Path,
    back_off_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    **settings,
) -> EngineSupervisor:
    configured = Settings(base="x", home=tmp_path, **settings)
    metrics = Metrics()
    client = EngineClient(LocalStore(tmp_path / "adapters"), metrics, url=configured.engine_url)
    return EngineSupervisor(
        configured,
        client,
        metrics,
        tmp_path / "engine.log",
        Hardware("x86_64"),
        Quantization("none"),
        derive_sizing(configured, Workload(), MACHINE, SHAPE),
        back_off_sleep=back_off_sleep,
    )


def sample(supervisor: EngineSupervisor, name: str, **labels: str) -> float | None:
    return supervisor.metrics.registry.get_sample_value(name, labels)


async def _until(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_a_missing_engine_python_is_retried_into_a_crash_loop_and_stop_ends_it(tmp_path):
    clock = FakeSleep()  # the back-offs are asked for, and waited out by `advance`
    supervisor = supervisor_for(
        tmp_path, clock.sleep, engine_python=str(tmp_path / "no-such-python")
    )
    await supervisor.start()
    try:
        await _until(lambda: supervisor.failed_starts == 1)
        assert supervisor.state == "restarting" and "no-such-python" in supervisor.last_error
        await _until(lambda: clock.delays == [1.0])
        clock.advance(1.0)
        await _until(lambda: clock.delays == [1.0, 2.0])
        assert supervisor.failed_starts == 2 and supervisor.state == "restarting"
        clock.advance(2.0)
        await _until(lambda: supervisor.state == "crash_loop")  # after 1 s and 2 s of back-off
        await _until(lambda: clock.delays == [1.0, 2.0, 5.0])  # the next start waits 5 s
        assert supervisor.failed_starts == 3 and supervisor.starts == 0 and not supervisor.client.up
        assert sample(supervisor, "lorafleet_engine_state", state="crash_loop") == 1
        assert sample(supervisor, "lorafleet_engine_state", state="up") == 0
        assert sample(supervisor, "lorafleet_engine_failed_starts") == 3
        # a failed start, no bug
        assert sample(supervisor, "lorafleet_engine_supervision_errors_total") == 0
    finally:
        await supervisor.stop()  # in the middle of a back-off: the cancellation goes through
    assert supervisor._task is not None and supervisor._task.cancelled()
    assert (
        supervisor.state == "stopped"
        and sample(supervisor, "lorafleet_engine_state", state="stopped") == 1
    )


async def test_an_engine_exiting_during_start_leaves_its_exit_code(tmp_path):
    supervisor = supervisor_for(tmp_path, engine_python=str(engine_script(tmp_path, "exit 3")))
    await supervisor.start()
    try:
        await _until(lambda: supervisor.failed_starts == 1)
        assert supervisor.starts == 1 and supervisor.last_exit_code == 3
        assert supervisor.last_error == "exited with 3 during start"
        assert sample(supervisor, "lorafleet_engine_last_exit_code") == 3
        assert supervisor.status() == {
            "engine_state": "restarting",
            "failed_starts": 1,
            "last_exit_code": 3,
            "last_error": "exited with 3 during start",
        }
    finally:
        await supervisor.stop()


async def test_an_error_inside_supervision_is_counted_and_the_next_start_comes_up(
    tmp_path, monkeypatch
):
    clock = FakeSleep()
    supervisor = supervisor_for(
        tmp_path, clock.sleep, engine_python=str(engine_script(tmp_path, "exec sleep 60"))
    )
    answers = iter([RuntimeError("health check broke")])

    async def healthy() -> bool:
        """Raises once (a bug in the health check), then the engine answers."""
        if (error := next(answers, None)) is not None:
            raise error
        return True

    monkeypatch.setattr(supervisor.client, "healthy", healthy)
    await supervisor.start()
    try:
        await _until(lambda: clock.delays == [1.0])  # the failed start's back-off
        clock.advance(1.0)
        await _until(lambda: supervisor.state == "up")
        assert sample(supervisor, "lorafleet_engine_supervision_errors_total") == 1
        assert "health check broke" in supervisor.last_error
        assert supervisor.starts == 2 and supervisor.failed_starts == 1 and supervisor.client.up
        # the second engine
        assert supervisor.process is not None and supervisor.process.returncode is None
    finally:
        await supervisor.stop()


async def test_an_attached_engine_that_is_gone_is_unreachable_and_still_followed(
    tmp_path, monkeypatch
):
    supervisor = supervisor_for(tmp_path, engine_url=f"http://127.0.0.1:{free_port()}")
    await supervisor.start()
    try:
        await _until(lambda: supervisor.state == "unreachable")

        async def broken() -> bool:
            raise RuntimeError("client closed")

        monkeypatch.setattr(supervisor.client, "healthy", broken)
        await _until(lambda: sample(supervisor, "lorafleet_engine_supervision_errors_total") == 1)
        assert supervisor.state == "unreachable" and not supervisor._task.done()
    finally:
        await supervisor.stop()
