"""The vLLM OpenAI server's command line and environment for lorafleet's settings and this hardware."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from typing import Any

from lorafleet.serve.engine.hardware import Quantization
from lorafleet.serve.engine.sizing import EngineSizing, sizing_for
from lorafleet.serve.settings import Settings

__all__ = ["engine_command", "engine_process_options", "free_port", "SERVED_BASE_NAME"]

SERVED_BASE_NAME = "lorafleet-base"


def engine_command(settings: Settings, port: int, token: str, cuda: bool, quantization: Quantization,
                   sizing: EngineSizing | None = None) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for these settings, this hardware, quantization and sizing
    (default: derived for this machine with nothing deployed, values that `settings` fix kept)."""
    sizing = sizing or sizing_for(settings, cuda, quantization.dtype or settings.dtype)
    python = settings.engine_python or sys.executable
    # "--api-key=…": a random token may start with "-", which argparse would read as an option
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", settings.base,
           "--served-model-name", SERVED_BASE_NAME, "--host", "127.0.0.1", "--port", str(port), f"--api-key={token}",
           "--enable-lora", "--max-lora-rank", str(sizing.max_lora_rank), "--max-loras", str(sizing.max_loras),
           "--max-cpu-loras", str(sizing.max_cpu_loras), "--max-model-len", str(settings.max_model_len),
           "--max-num-seqs", str(sizing.max_num_seqs), "--dtype", quantization.dtype or settings.dtype,
           "--disable-uvicorn-access-log", *quantization.engine_args]
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if not cuda:  # CPU settings measured in shared/env-notes.md
        cmd += ["--enforce-eager", "--gpu-memory-utilization", str(settings.cpu_memory_fraction)]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(sizing.kvcache_gib)
    return cmd + list(settings.engine_extra_args), env


def _die_with_parent() -> None:
    """Linux: the engine gets SIGTERM if the gateway dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def engine_process_options() -> dict[str, Any]:
    """How the engine process is placed (keyword arguments for subprocess / asyncio's subprocess functions).

    Its own process group, so that vLLM's engine-core and worker processes are stopped with it (killpg).
    """
    return {"preexec_fn": _die_with_parent, "start_new_session": True}


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
