"""The vLLM OpenAI server's command line and environment for lorafleet's settings and this hardware."""

from __future__ import annotations

import os
import socket
import sys

from lorafleet.serve.engine.hardware import Quantization
from lorafleet.serve.settings import Settings

__all__ = ["engine_command", "free_port", "SERVED_BASE_NAME"]

SERVED_BASE_NAME = "lorafleet-base"


def engine_command(settings: Settings, port: int, token: str, cuda: bool,
                   quantization: Quantization) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for these settings, this hardware and quantization."""
    python = settings.engine_python or sys.executable
    # "--api-key=…": a random token may start with "-", which argparse would read as an option
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", settings.base,
           "--served-model-name", SERVED_BASE_NAME, "--host", "127.0.0.1", "--port", str(port), f"--api-key={token}",
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
