"""Greedy generations from vLLM itself, for the base and any adapters, in a child process.

vLLM's offline engine spawns workers and must run under `__main__`, so callers use `generate()`,
which runs this module as a script: `python -m train.vllm_generate REQUEST.json RESULT.json`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from lorafleet.adapters.base_model import base_config, tower_lora_supported, training_dtype
from lorafleet.adapters.pictures import PictureBudget, default_pictures
from lorafleet.adapters.validate import engine_lora_rank
from lorafleet.errors import VLLMFailed

__all__ = ["generate", "VLLMFailed"]


def _absolute(name_or_path: str) -> str:
    """A local folder as an absolute path (vLLM takes a relative name it cannot find for a hub
    id)."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def generate(
    base: str,
    adapters: dict[str, str | None],
    prompts: list[list[dict]],
    max_tokens: int,
    max_rank: int = 16,
    dtype: str | None = None,
    llm_kwargs: dict | None = None,
    pictures: PictureBudget | None = None,
    tower_lora: bool | None = None,
) -> dict[str, list[dict]]:
    """{name: [{"text", "token_ids"} per prompt]}; `adapters` maps names to folders (None = the
    base).

    `llm_kwargs` go to vLLM's `LLM(...)` as they are, e.g. a quantization planned by
    `lorafleet.serve.engine.hardware`; pictures are scaled down to `pictures` (default: as a
    server with default settings scales them); LoRA applies to the vision tower and connector
    with `tower_lora` (default: as a server with default settings, where the base supports it)."""
    import torch

    if tower_lora is None:
        tower_lora = tower_lora_supported(base_config(base).architectures)
    if tower_lora:
        llm_kwargs = {"enable_tower_connector_lora": True, **(llm_kwargs or {})}
    pictures = pictures or default_pictures(base)
    if pictures is not None and pictures.scales_down:
        llm_kwargs = {
            "mm_processor_kwargs": {"max_pixels": pictures.max_pixels},
            **(llm_kwargs or {}),
        }
    dtype = dtype or training_dtype(base, torch.cuda.is_available())  # the trainer's
    rank = engine_lora_rank(max_rank)
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        adapters = {name: _absolute(path) if path else None for name, path in adapters.items()}
        request.write_text(
            json.dumps(
                {
                    "base": _absolute(base),
                    "adapters": adapters,
                    "prompts": prompts,
                    "max_tokens": max_tokens,
                    "max_rank": rank,
                    "dtype": dtype,
                    "llm_kwargs": llm_kwargs or {},
                }
            )
        )
        run = subprocess.run(
            [sys.executable, "-m", "lorafleet.train.vllm_generate", str(request), str(result)],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0 or not result.is_file():
            raise VLLMFailed(
                f"vLLM generation failed (exit {run.returncode}): {run.stderr[-2000:]}"
            )
        return json.loads(result.read_text())


def _main(request_file: str, result_file: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    request = json.loads(Path(request_file).read_text())
    llm = LLM(
        model=request["base"],
        enable_lora=True,
        max_lora_rank=request["max_rank"],
        max_loras=1,
        max_model_len=2048,
        max_num_seqs=16,
        dtype=request["dtype"],
        enforce_eager=True,
        gpu_memory_utilization=0.2 if not _cuda() else 0.8,
        **request["llm_kwargs"],
    )
    params = SamplingParams(temperature=0, max_tokens=request["max_tokens"])
    results = {}
    for i, (name, path) in enumerate(request["adapters"].items(), start=1):
        lora = LoRARequest(f"adapter-{i}", i, path) if path else None
        outputs = llm.chat(request["prompts"], params, lora_request=lora, use_tqdm=False)
        results[name] = [
            {"text": o.outputs[0].text, "token_ids": list(o.outputs[0].token_ids)} for o in outputs
        ]
    Path(result_file).write_text(json.dumps(results))
    llm.llm_engine.engine_core.shutdown()  # otherwise exit waits forever on the engine-core process


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
