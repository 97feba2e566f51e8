"""The vLLM OpenAI server's command line and environment for lorafleet's settings and this
hardware."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from lorafleet.adapters.base_model import tower_lora_supported
from lorafleet.adapters.pictures import PictureBudget, picture_budget
from lorafleet.serve.engine.hardware import Quantization, quantization_for
from lorafleet.serve.engine.sizing import EngineSizing, sizing_for
from lorafleet.serve.settings import Settings

__all__ = [
    "engine_command",
    "engine_pictures",
    "node_command",
    "engine_process_options",
    "free_port",
    "tool_call_parser",
    "tower_lora",
    "SERVED_BASE_NAME",
]

SERVED_BASE_NAME = "lorafleet-base"
NODE_INFO_ENV = "LORAFLEET_NODE_INFO"
RESIDENCY_FILE_ENV = "LORAFLEET_NODE_RESIDENCY_FILE"


def engine_command(
    settings: Settings,
    port: int,
    token: str,
    cuda: bool,
    quantization: Quantization,
    sizing: EngineSizing | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The vLLM server command line and environment for these settings, this hardware,
    quantization and sizing (default: derived for this machine with nothing deployed, values that
    `settings` fix kept)."""
    sizing = sizing or sizing_for(settings, cuda, quantization.dtype or settings.dtype)
    python = settings.engine_python or sys.executable
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        settings.base,
        "--served-model-name",
        SERVED_BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(sizing.max_lora_rank),
        "--max-loras",
        str(sizing.max_loras),
        "--max-cpu-loras",
        str(sizing.max_cpu_loras),
        "--max-model-len",
        str(settings.max_model_len),
        "--max-num-seqs",
        str(sizing.max_num_seqs),
        "--dtype",
        quantization.dtype or settings.dtype,
        "--disable-uvicorn-access-log",
        *_per_request_metrics(settings),
        *quantization.engine_args,
        *_tool_calling(settings),
        *_picture_budget(settings),
        *(["--enable-tower-connector-lora"] if tower_lora(settings) else []),
    ]
    # the token goes in the environment, which only its owner (and root) can read, not in argv,
    # which every local user can (/proc/<pid>/cmdline, ps); vLLM reads VLLM_API_KEY when --api-key
    # is not given
    env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_API_KEY": token}
    if not cuda:  # vLLM's CPU engine needs eager mode and a RAM share (its default 0.92 refuses)
        cmd += ["--enforce-eager", "--gpu-memory-utilization", str(settings.cpu_memory_fraction)]
        env["VLLM_CPU_KVCACHE_SPACE"] = str(sizing.kvcache_gib)
    return cmd + list(settings.engine_extra_args), env


def _per_request_metrics(settings: Settings) -> list[str]:
    """Each answer carries the engine's own prefill and decode times (`metrics`), which usage
    records as engine time and the gateway removes from the client's answer. vLLM computes them
    from its statistics, which `--disable-log-stats` turns off (it then refuses the flag)."""
    if "--disable-log-stats" in settings.engine_extra_args:
        return []
    return ["--enable-per-request-metrics"]


# vLLM's tool-call parser for each model family whose chat template writes the calls it reads
TOOL_CALL_PARSERS = {
    "qwen2_vl": "hermes",
    "qwen2_5_vl": "hermes",
    "qwen3_vl": "hermes",
    "qwen3_vl_moe": "hermes",
    "mllama": "llama3_json",
    "mistral3": "mistral",
    "pixtral": "mistral",
}


def tool_call_parser(settings: Settings) -> str | None:
    """The parser `LORAFLEET_TOOL_CALL_PARSER` means for this base; None: no tool calling."""
    if settings.tool_call_parser == "none":
        return None
    if settings.tool_call_parser != "auto":
        return settings.tool_call_parser
    return TOOL_CALL_PARSERS.get(_model_type(settings.base))


def _model_type(base: str) -> str:
    return str(_config_json(base).get("model_type", ""))


def _config_json(base: str) -> dict:
    """The base's config.json: a local folder's, or a hub id's in the hub's cache (where the
    gateway's reading of the base put it; never the network); {} where there is none."""
    local = Path(base) / "config.json"
    config: Path | None = local
    if not local.is_file():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base, "config.json")
        except ValueError:  # not a hub id either (e.g. a folder that is not there)
            cached = None
        config = Path(cached) if isinstance(cached, str) else None
    try:
        found = json.loads(config.read_text()) if config else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def engine_pictures(settings: Settings) -> PictureBudget | None:
    """The picture budget of the engine these settings start."""
    return picture_budget(settings.base, settings.max_image_tokens, settings.max_model_len)


def _picture_budget(settings: Settings) -> list[str]:
    """vLLM's processor bound that scales pictures down to the budget (none where nothing
    changes: the base's own processor bound is lower, or it does not size pictures by pixels)."""
    budget = engine_pictures(settings)
    if budget is None or not budget.scales_down:
        return []
    return ["--mm-processor-kwargs", json.dumps({"max_pixels": budget.max_pixels})]


def tower_lora(settings: Settings) -> bool:
    """Whether the engine these settings start applies LoRA to the vision tower and connector:
    unless `LORAFLEET_TOWER_LORA=off`, whenever vLLM supports it for the base. `on` with a base
    without support is a ValueError."""
    if settings.tower_lora == "off":
        return False
    supported = tower_lora_supported(_config_json(settings.base).get("architectures"))
    if settings.tower_lora == "on" and not supported:
        raise ValueError(
            f"LORAFLEET_TOWER_LORA=on, but vLLM applies LoRA to the language model only for "
            f"{settings.base}; use auto or off"
        )
    return supported


def _tool_calling(settings: Settings) -> list[str]:
    parser = tool_call_parser(settings)
    return ["--enable-auto-tool-choice", "--tool-call-parser", parser] if parser else []


def node_command(settings: Settings, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """An engine node's vLLM command line and environment (`lorafleet engine`): reachable on
    `host`, guarded by `LORAFLEET_ENGINE_API_KEY`, finding adapters by digest in the store
    (`lorafleet.serve.engine.resolver`), and accepting every rank an upload may have (no gateway
    beside it to derive one from what is deployed)."""
    if settings.engine_api_key is None and not settings.development:
        raise ValueError(
            "LORAFLEET_ENGINE_API_KEY is not set: an engine node needs the secret its gateways "
            "send (or LORAFLEET_DEVELOPMENT=1 to run one without)"
        )
    settings = settings.model_copy(update={"max_lora_rank": settings.accepted_lora_rank})
    hardware, quantization = quantization_for(settings)
    token = settings.engine_api_key.get_secret_value() if settings.engine_api_key else ""
    sizing = sizing_for(settings, hardware.gpu is not None, quantization.dtype or settings.dtype)
    cmd, env = engine_command(settings, port, token, hardware.gpu is not None, quantization, sizing)
    cmd[cmd.index("--host") + 1] = host
    if not token:
        del env["VLLM_API_KEY"]
    # what the node says of itself on its /metrics (`lorafleet_node_info`, published by the resolver
    # plugin)
    info = {
        "hardware": hardware.describe(),
        "quantization": quantization.label,
        "max_num_seqs": str(sizing.max_num_seqs),
        "max_loras": str(sizing.max_loras),
        "max_cpu_loras": str(sizing.max_cpu_loras),
        "max_lora_rank": str(sizing.max_lora_rank),
        "tower_lora": str(tower_lora(settings)).lower(),
    }
    # where its worker writes the residency of its adapters (`loaded_adapters`), one file per node
    residency = settings.home / "engine" / f"residency-{port}.json"
    return cmd, env | {
        "LORAFLEET_ENGINE_RESOLVER": "1",
        NODE_INFO_ENV: json.dumps(info),
        RESIDENCY_FILE_ENV: str(residency),
    }


def _in_the_child(nice: int) -> None:
    # its own session: its own process group (killpg stops vLLM's every process) and autogroup
    os.setsid()
    if nice:
        with contextlib.suppress(OSError):  # only where the kernel groups sessions (autogroups)
            with open("/proc/self/autogroup", "w") as autogroup:
                autogroup.write(str(nice))
        os.nice(nice)  # where it does not
    with contextlib.suppress(Exception):  # Linux: SIGTERM when the gateway dies without cleaning up
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def engine_process_options(settings: Settings) -> dict[str, Any]:
    """Where the engine runs (keyword arguments for subprocess / asyncio's subprocess functions).

    In a session of its own, at a lower CPU priority (`engine_nice`). vLLM's scheduler and worker
    busy-poll (`sched_yield`) for about a second after every batch; with scheduler autogroups (on in
    most desktop and VM kernels) `sched_yield` gives way only within the caller's own session, so a
    poller sharing the CPU with the gateway or a client in another session held on to it. At a lower
    priority the pollers only take CPU time that nothing else wants, wherever the gateway and its
    clients were started (loadtests/bench_gateway.py measures both arrangements). uvloop's
    subprocess_exec has no `process_group`, hence the function run in the child.
    """
    return {"preexec_fn": functools.partial(_in_the_child, settings.engine_nice)}


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
