"""A deployment that needs a larger max LoRA rank: the supervisor restarts the engine with it, or
refuses (409) when LORAFLEET_MAX_LORA_RANK fixes the rank. No vLLM: the launched "engine" is a
sleeping process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorafleet.adapters.store import LocalStore
from lorafleet.errors import Conflict
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.engine.command import engine_command
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.sizing import (
    GIB,
    EngineSizing,
    Machine,
    ModelShape,
    Workload,
    derive_sizing,
)
from lorafleet.serve.engine.supervisor import EngineSupervisor
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

MACHINE = Machine(ram_bytes=24 * GIB, cpus=2)
SHAPE = ModelShape(lora_features=4096, kv_bytes_per_token=1024, dtype_bytes=4)


def supervisor_for(tmp_path: Path, workload: Workload = Workload(), **settings) -> EngineSupervisor:
    configured = Settings(base="x", home=tmp_path, **settings)
    metrics = Metrics()
    client = EngineClient(LocalStore(tmp_path / "adapters"), metrics)
    return EngineSupervisor(
        configured,
        client,
        metrics,
        tmp_path / "engine.log",
        Hardware("x86_64"),
        Quantization("none"),
        derive_sizing(configured, workload, MACHINE, SHAPE),
    )


async def test_a_fixed_rank_refuses_a_larger_adapter_naming_the_setting_and_both_ranks(tmp_path):
    supervisor = supervisor_for(tmp_path, max_lora_rank=16)
    with pytest.raises(Conflict) as refused:
        await supervisor.resize_for(Workload(adapters=2, max_rank=32))
    assert refused.value.status == 409
    assert all(
        part in refused.value.message for part in ("LORAFLEET_MAX_LORA_RANK", "rank 32", "rank 16")
    )
    assert supervisor.sizing.max_lora_rank == 16


async def test_a_derived_rank_grows_with_the_adapter_and_the_engine_goes_down(tmp_path):
    supervisor = supervisor_for(tmp_path, workload=Workload(adapters=1, max_rank=16))
    supervisor.client.mark_up()
    await supervisor.resize_for(Workload(adapters=2, max_rank=16))  # fits: nothing happens
    assert supervisor.client.up and supervisor.sizing.max_lora_rank == 16
    await supervisor.resize_for(Workload(adapters=2, max_rank=64))
    assert (
        supervisor.sizing.max_lora_rank == 64
        and "largest deployed rank 64" in supervisor.sizing.describe()
    )
    assert not supervisor.client.up  # a catalog change now leaves registration to the next start
    cmd, _ = engine_command(
        supervisor.settings, 1, "t", False, supervisor.quantization, supervisor.sizing
    )
    assert cmd[cmd.index("--max-lora-rank") + 1] == "64"  # what the next process is launched with
    assert supervisor.settings.max_lora_rank == 0  # still derived


async def test_resize_replaces_the_running_process_at_once_without_counting_a_failure(
    tmp_path, monkeypatch
):
    supervisor = supervisor_for(tmp_path)
    launched: list[tuple[EngineSizing, int]] = []

    async def launch() -> bool:
        """A stand-in engine in a process group of its own, as the real one."""
        supervisor.process = await asyncio.create_subprocess_exec(
            "sleep", "60", start_new_session=True
        )
        launched.append((supervisor.sizing, supervisor.process.pid))
        supervisor.client.mark_up()
        return True

    monkeypatch.setattr(supervisor, "_launch", launch)
    await supervisor.start()
    try:
        await _until(lambda: len(launched) == 1)
        first = supervisor.process
        assert first is not None
        await supervisor.resize(derive_sizing(supervisor.settings, Workload(1, 32), MACHINE, SHAPE))
        # well before the 5 s health check or any back-off
        await _until(lambda: len(launched) == 2, timeout=3.0)
        assert first.returncode is not None  # the old engine was stopped
        assert [sizing.max_lora_rank for sizing, _ in launched] == [16, 32]
        assert supervisor.metrics.registry.get_sample_value("lorafleet_engine_restarts_total") == 0
    finally:
        await supervisor.stop()


async def _until(condition, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)
