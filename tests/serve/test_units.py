"""Pure gateway logic: bounded metric labels, engine command line, settings."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorafleet.serve.engine.command import engine_command, engine_process_options
from lorafleet.serve.engine.hardware import Quantization
from lorafleet.serve.engine.sizing import (
    GIB,
    EngineSizing,
    Machine,
    ModelShape,
    Workload,
    derive_sizing,
)
from lorafleet.serve.metrics import OTHER, Metrics
from lorafleet.serve.settings import Settings


def test_metric_labels_fold_into_other_past_the_budget():
    metrics = Metrics(max_series=2)
    assert metrics.labels("a", "d1", "x" * 64, "stable") == ("a", "d1", "x" * 12, "stable")
    assert metrics.labels("a", "d2", "y" * 64, "canary") == ("a", "d2", "y" * 12, "canary")
    assert metrics.labels("b", "d3", "z" * 64, "stable") == (OTHER, OTHER, OTHER, OTHER)
    assert metrics.labels("a", "d1", "x" * 64, "stable") == ("a", "d1", "x" * 12, "stable")


def _sizing(settings: Settings, gpu: bool = False, workload: Workload = Workload()) -> EngineSizing:
    machine = Machine(ram_bytes=24 * GIB, cpus=2, gpu_memory_bytes=80 * GIB if gpu else None)
    return derive_sizing(
        settings,
        workload,
        machine,
        ModelShape(lora_features=4096, kv_bytes_per_token=1024, dtype_bytes=4),
    )


def test_engine_command_uses_cpu_settings_without_cuda():
    settings = Settings(base="/m", max_lora_rank=16, cpu_kvcache_gib=2)
    cmd, env = engine_command(
        settings, 9000, "-s3cret", False, Quantization("none"), _sizing(settings)
    )
    assert cmd[cmd.index("--max-lora-rank") + 1] == "16" and "--enable-lora" in cmd
    assert "--enforce-eager" in cmd and env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # the engine is never reachable from outside
    # the token is in the environment (readable by the owner only), not in argv (readable by every
    # local user)
    assert env["VLLM_API_KEY"] == "-s3cret" and not any(
        "s3cret" in arg or "api-key" in arg for arg in cmd
    )


def test_tool_calling_is_on_for_a_base_whose_parser_vllm_has(tmp_path):
    import json

    from tests.factories import TINY_BASE_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))  # a Qwen2.5-VL
    quantization = Quantization("none")

    def command(**settings) -> list[str]:
        given = Settings(base=str(tmp_path), **settings)
        return engine_command(given, 9000, "t", False, quantization, _sizing(given))[0]

    auto = command()
    assert "--enable-auto-tool-choice" in auto
    assert auto[auto.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" not in command(tool_call_parser="none")
    chosen = command(tool_call_parser="pythonic")
    assert chosen[chosen.index("--tool-call-parser") + 1] == "pythonic"
    other = {**TINY_BASE_CONFIG, "model_type": "idefics3"}  # no parser vLLM knows for it
    (tmp_path / "config.json").write_text(json.dumps(other))
    assert "--tool-call-parser" not in command()


def test_tower_lora_is_on_the_engine_command_for_a_base_that_supports_it(tmp_path):
    import json

    from tests.factories import TINY_BASE_CONFIG

    (tmp_path / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))  # a Qwen2.5-VL

    def command(**settings) -> list[str]:
        given = Settings(base=str(tmp_path), **settings)
        return engine_command(given, 9000, "t", False, Quantization("none"), _sizing(given))[0]

    assert "--enable-tower-connector-lora" in command()
    assert "--enable-tower-connector-lora" in command(tower_lora="on")
    assert "--enable-tower-connector-lora" not in command(tower_lora="off")
    other = {**TINY_BASE_CONFIG, "architectures": ["Idefics2ForConditionalGeneration"]}
    (tmp_path / "config.json").write_text(json.dumps(other))
    assert "--enable-tower-connector-lora" not in command()
    with pytest.raises(ValueError, match="LORAFLEET_TOWER_LORA=on"):
        command(tower_lora="on")  # asked for, and the base cannot: no engine starts


def test_engine_command_leaves_gpu_defaults_with_cuda():
    settings = Settings(base="/m")
    cmd, env = engine_command(
        settings,
        9000,
        "tok",
        True,
        Quantization("int8", ("--quantization", "x")),
        _sizing(settings, gpu=True),
    )
    assert "--enforce-eager" not in cmd
    assert "--gpu-memory-utilization" not in cmd and "VLLM_CPU_KVCACHE_SPACE" not in env
    assert cmd[cmd.index("--quantization") + 1] == "x"


def test_engine_command_passes_the_derived_sizing():
    settings = Settings(base="/m")
    sizing = _sizing(settings, workload=Workload(adapters=64, max_rank=24))
    cmd, env = engine_command(settings, 9000, "tok", False, Quantization("none"), sizing)
    assert [
        cmd[cmd.index(flag) + 1]
        for flag in ("--max-lora-rank", "--max-loras", "--max-cpu-loras", "--max-num-seqs")
    ] == ["32", "64", str(sizing.max_cpu_loras), "64"]
    assert sizing.max_cpu_loras >= 2 * 64  # every deployed adapter stays in memory
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_uploads_accept_rank_64_while_the_engine_rank_is_derived():
    assert Settings().accepted_lora_rank == 64
    assert Settings(max_lora_rank=16).accepted_lora_rank == 16
    assert Settings(max_lora_rank=128).accepted_lora_rank == 128


def test_settings_default_to_sqlite_and_local_store_under_home(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.database_url == f"sqlite:///{tmp_path / 'catalog.db'}"
    assert settings.store_url == f"file://{tmp_path / 'adapters'}"


def test_serving_without_admin_key_needs_development_mode():
    with pytest.raises(ValueError, match="LORAFLEET_ADMIN_KEY"):
        Settings().require_admin_key()
    Settings(development=True).require_admin_key()


@pytest.mark.parametrize("nice", [10, 0])
def test_the_engine_runs_in_its_own_session_at_the_configured_priority(nice):
    probe = (
        "import os; print(os.getsid(0), os.getpgid(0), os.getpid(), "
        "os.getpriority(os.PRIO_PROCESS, 0))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        **engine_process_options(Settings(engine_nice=nice)),
    )
    sid, pgid, pid, priority = map(int, done.stdout.split())
    assert sid == pgid == pid != os.getsid(0)  # a session and process group of its own
    assert priority == os.getpriority(os.PRIO_PROCESS, 0) + nice
