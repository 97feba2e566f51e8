"""lorafleet's fixes to the vLLM it runs, applied in each engine process (vLLM's general-plugin
hook) where `LORAFLEET_ENGINE_FIXES` is on (the default). Both were found serving thousands of
adapters.

Adapter lookup. Before every step, vLLM's worker asks its LoRA manager, for each distinct adapter
of the batch, whether it is in memory: `LRUCacheWorkerLoRAManager.add_adapter` tests
`id not in self.list_adapters()`, and `list_adapters` copies the whole LRU (three copies: the
cache's view, a dict, a set). With 2,000 adapters in memory that lookup took 39 % of the worker's
time (py-spy, Zipf traffic of 16 clients over 2,000 adapters on CPU), which was served at 0.62× the
throughput of one adapter (0.96× with the fix). The fix answers with one dictionary lookup and then
does what vLLM's own code does for an adapter that is present (touch it in the LRU, activate it in
a slot); anything else (a new adapter, an in-place reload) still goes through vLLM's method.

Adapter metric. `vllm:lora_requests_info` is a gauge labelled with the running and the waiting
adapters (comma-joined), set to the current time on each stats update; every new combination of
adapters became a new series that was never removed: 4,584 series and an 8.7 MB `/metrics` page
after ten minutes of traffic over 2,000 adapters (0.25 s to render, and lorafleet reads it every
second). Its readers take the series with the latest time (llm-d's endpoint picker does), so the
fix keeps that one only.

It patches only the vLLM version it was measured on (`FIXED_VLLM`) and only where the method and
attributes it relies on are there; otherwise vLLM runs as released, with one warning.
"""

from __future__ import annotations

import logging

__all__ = ["FIXED_VLLM", "LatestSeriesOnly", "apply", "read_against", "register"]

log = logging.getLogger("lorafleet.engine.fixes")

FIXED_VLLM = ("0.32.",)  # the versions whose code this was read against


def apply() -> bool:
    """Patch this process's vLLM; True when patched (or already)."""
    from vllm.lora import worker_manager

    manager_class = worker_manager.LRUCacheWorkerLoRAManager
    if getattr(manager_class.add_adapter, "_lorafleet_fix", False):
        return True
    if not read_against("lorafleet's fixes", hasattr(worker_manager, "gpu_sync_allowed")):
        return False
    released = manager_class.add_adapter

    def add_adapter(self, lora_request) -> bool:
        manager = self._adapter_manager
        lora_id = lora_request.lora_int_id
        # the LRU's own membership test (a dict lookup), where vLLM copies the whole LRU
        if lora_request.load_inplace or lora_id not in manager._registered_adapters:
            return released(self, lora_request)
        with worker_manager.gpu_sync_allowed():
            loaded = manager.get_adapter(lora_id) is not None  # touches it in the LRU
            manager.activate_adapter(lora_id)
        return loaded

    add_adapter._lorafleet_fix = True  # type: ignore[attr-defined]
    manager_class.add_adapter = add_adapter  # type: ignore[method-assign]
    _keep_the_latest_adapter_series()
    return True


def read_against(what: str, present: bool = True) -> bool:
    """Whether this process's vLLM is the release `what` was read against (`FIXED_VLLM`) and has
    what it relies on (`present`); if not, one warning: vLLM runs as released there."""
    import vllm

    if vllm.__version__.startswith(FIXED_VLLM) and present:
        return True
    log.warning(
        "vLLM %s runs as released, without %s (read against vLLM %s)",
        vllm.__version__,
        what,
        ", ".join(v + "x" for v in FIXED_VLLM),
    )
    return False


class LatestSeriesOnly:
    """A labelled gauge that holds only its most recently labelled series."""

    def __init__(self, gauge) -> None:
        self.gauge = gauge
        self._labels: dict | None = None

    def labels(self, **labels):
        if labels != self._labels:
            self.gauge.clear()
            self._labels = labels
        return self.gauge.labels(**labels)


def _keep_the_latest_adapter_series() -> None:
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    released_init = PrometheusStatLogger.__init__

    def __init__(self, *args, **kwargs) -> None:
        released_init(self, *args, **kwargs)
        if getattr(self, "gauge_lora_info", None) is not None:
            self.gauge_lora_info = LatestSeriesOnly(self.gauge_lora_info)

    PrometheusStatLogger.__init__ = __init__  # type: ignore[method-assign]


def register() -> None:
    """vLLM's plugin hook (entry point `vllm.general_plugins`, run in each vLLM process): the
    fixes, unless `LORAFLEET_ENGINE_FIXES` is off."""
    from lorafleet.serve.settings import Settings

    if Settings().engine_fixes:
        apply()
