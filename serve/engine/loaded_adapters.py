"""An engine node's adapter residency on its `/metrics`, in the vocabulary vLLM proposes for it
(vllm-project/vllm#54830, which llm-d's `lora-load-state-scorer` reads), so an InferencePool's
endpoint picker can send a request to a pod that already holds its adapter:

    vllm:lora_adapter_loaded{model_name, adapter_name, level, pinned, rank}   1
        one series per adapter in the engine's caches: level "gpu" while it holds one of the
        batch's LoRA slots (`max_loras`; vLLM's word whatever the device), "cpu" while it is in
        memory only (`max_cpu_loras`); gone once evicted
    vllm:num_gpu_loaded_lora_adapters, vllm:num_cpu_loaded_lora_adapters   the series per level
    vllm:max_gpu_lora_adapters, vllm:max_cpu_lora_adapters                 slots and capacity

vLLM's own `vllm:lora_requests_info` lists adapters with a request running or waiting only: an
idle adapter in memory looks absent (llm-d-router#2605).

vLLM's worker (its engine-core process) holds the caches, its API server serves `/metrics`. A
thread in the worker looks at the caches every `_INTERVAL_S` (nothing is added to a step's path)
and writes them to the node's residency file whenever they changed; the API server reads that
file when it is scraped. Both halves are vLLM general plugins' work (`register`, on engine nodes
only), patched in only where the worker's LoRA manager has what they read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafleet.serve.engine.command import RESIDENCY_FILE_ENV

__all__ = ["RESIDENCY_FILE_ENV", "ResidencyCollector", "snapshot", "register"]

log = logging.getLogger("lorafleet.engine.residency")

_INTERVAL_S = 0.25
_LABELS = ("model_name", "adapter_name", "level", "pinned", "rank")


def snapshot(worker: Any) -> dict[str, Any]:
    """What a vLLM `LRUCacheWorkerLoRAManager` holds: each adapter it loaded by name (its
    digest), its level, whether pinned, its rank; the slots and the capacity."""
    manager = worker._adapter_manager
    names: dict[int, str] = getattr(worker, "_lorafleet_names", {})
    registered = manager._registered_adapters
    in_slots = set(list(manager.lora_index_to_id))
    pinned = set(registered.pinned_items) | set(manager._active_adapters.pinned_items)
    adapters = [
        {
            "name": names[lora_id],
            "level": "gpu" if lora_id in in_slots else "cpu",
            "pinned": lora_id in pinned,
            "rank": int(model.rank),
        }
        # its read-only view, as vLLM's own `list_adapters` reads it (an item lookup would move
        # the adapter up the LRU)
        for lora_id, model in dict(registered.cache).items()
        if lora_id in names  # (not vLLM's warm-up dummies)
    ]
    return {
        "adapters": sorted(adapters, key=lambda a: a["name"]),
        "max_gpu": int(manager.lora_slots),
        "max_cpu": int(manager.capacity),
    }


def _publish_forever(worker_ref: weakref.ref, path: Path) -> None:
    written: str | None = None
    while (worker := worker_ref()) is not None:
        text: str | None
        try:
            text = json.dumps(snapshot(worker))
        except RuntimeError:  # the caches changed while read: the next look
            text = written
        del worker
        if text != written and text is not None:
            partial = path.with_suffix(".partial")
            partial.write_text(text)
            os.replace(partial, path)  # the API server reads whole snapshots only
            written = text
        time.sleep(_INTERVAL_S)


def watch_worker(path: Path) -> bool:
    """Patch vLLM's worker-side LoRA manager to remember each adapter's name and publish its
    caches to `path` from the moment it exists; False (nothing patched) where it lacks what
    `snapshot` reads."""
    from vllm.lora import worker_manager

    from lorafleet.serve.engine.vllm_fixes import read_against

    manager_class = worker_manager.LRUCacheWorkerLoRAManager
    if getattr(manager_class.create_lora_manager, "_lorafleet_residency", False):
        return True
    # the caches' attributes `snapshot` reads are vLLM's internals: read where they were read
    if not read_against("its adapters' residency", hasattr(manager_class, "_load_adapter")):
        return False
    released_create = manager_class.create_lora_manager
    released_load = manager_class._load_adapter

    def create_lora_manager(self, *args, **kwargs):
        created = released_create(self, *args, **kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        threading.Thread(
            target=_publish_forever,
            args=(weakref.ref(self), path),
            name="lorafleet-residency",
            daemon=True,
        ).start()
        return created

    def _load_adapter(self, lora_request):
        self.__dict__.setdefault("_lorafleet_names", {})[lora_request.lora_int_id] = (
            lora_request.lora_name
        )
        return released_load(self, lora_request)

    create_lora_manager._lorafleet_residency = True  # type: ignore[attr-defined]
    manager_class.create_lora_manager = create_lora_manager  # type: ignore[method-assign]
    manager_class._load_adapter = _load_adapter  # type: ignore[method-assign]
    return True


class ResidencyCollector:
    """The residency file as Prometheus series (a custom collector: read when scraped, parsed
    again only when the file changed)."""

    def __init__(self, path: Path, model_name: str) -> None:
        self.path = path
        self.model_name = model_name
        self._read: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    def current(self) -> dict[str, Any]:
        """The last snapshot the worker wrote (nothing loaded before its first)."""
        try:
            stat = self.path.stat()  # (the worker replaces the file: a new inode each time)
            changed = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            return {"adapters": [], "max_gpu": 0, "max_cpu": 0}
        if self._read is None or self._read[0] != changed:
            with contextlib.suppress(FileNotFoundError, ValueError):
                self._read = (changed, json.loads(self.path.read_text()))
        return self._read[1] if self._read else {"adapters": [], "max_gpu": 0, "max_cpu": 0}

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        state = self.current()
        loaded = GaugeMetricFamily(
            "vllm:lora_adapter_loaded",
            "An adapter in the engine's caches: level gpu (in a LoRA slot of the batch) or cpu "
            "(in memory only)",
            labels=_LABELS,
        )
        counts = {"gpu": 0, "cpu": 0}
        for adapter in state["adapters"]:
            counts[adapter["level"]] += 1
            loaded.add_metric(
                [
                    self.model_name,
                    adapter["name"],
                    adapter["level"],
                    str(adapter["pinned"]).lower(),
                    str(adapter["rank"]),
                ],
                1,
            )
        yield loaded
        for name, value, text in (
            ("num_gpu_loaded_lora_adapters", counts["gpu"], "Adapters in LoRA slots"),
            ("num_cpu_loaded_lora_adapters", counts["cpu"], "Adapters in memory only"),
            ("max_gpu_lora_adapters", state["max_gpu"], "LoRA slots of a batch (max_loras)"),
            ("max_cpu_lora_adapters", state["max_cpu"], "Adapters memory holds (max_cpu_loras)"),
        ):
            family = GaugeMetricFamily(f"vllm:{name}", text, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


def register(model_name: str) -> None:
    """In each vLLM process of a node (its plugin hook): the worker publishes, the API server's
    /metrics reads; nothing where the node was started without a residency file."""
    raw = os.environ.get(RESIDENCY_FILE_ENV)
    if not raw:
        return
    path = Path(raw)
    if not watch_worker(path):
        return
    from prometheus_client import REGISTRY

    with contextlib.suppress(ValueError):  # registered already (the hook ran before here)
        REGISTRY.register(ResidencyCollector(path, model_name))
