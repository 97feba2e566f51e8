"""lorafleet's fix to a hot path of the vLLM it runs, applied in each engine process it starts
(vLLM's general-plugin hook) where `LORAFLEET_ENGINE_FIXES` is on (the default).

One so far. Before every step, vLLM's worker asks its LoRA manager, for each distinct adapter of the
batch, whether it is in memory: `LRUCacheWorkerLoRAManager.add_adapter` tests
`id not in self.list_adapters()`, and `list_adapters` copies the whole LRU (three copies: the
cache's view, a dict, a set). With 2,000 adapters in memory that lookup took 39 % of the worker's
time (py-spy, Zipf traffic of 16 clients over 2,000 adapters on CPU) and throughput fell to half of
that with 64 in memory. The fix answers the question with one dictionary lookup and then does what
vLLM's own code does for an adapter that is present (touch it in the LRU, activate it in a slot);
anything else (a new adapter, an in-place reload) still goes through vLLM's method.

It patches only the vLLM version it was measured on (`FIXED_VLLM`) and only where the method and
attributes it relies on are there; otherwise vLLM runs as released, with one warning.
"""

from __future__ import annotations

import logging

__all__ = ["FIXED_VLLM", "apply", "register"]

log = logging.getLogger("lorafleet.engine.fixes")

FIXED_VLLM = ("0.32.",)  # the versions whose code this was read against


def apply() -> bool:
    """Patch the adapter lookup of this process's vLLM; True when patched (or already)."""
    import vllm
    from vllm.lora import worker_manager

    manager_class = worker_manager.LRUCacheWorkerLoRAManager
    if getattr(manager_class.add_adapter, "_lorafleet_fix", False):
        return True
    if not vllm.__version__.startswith(FIXED_VLLM) or not hasattr(
        worker_manager, "gpu_sync_allowed"
    ):
        log.warning(
            "vLLM %s: adapter lookup left as released (lorafleet's fix is for %s)",
            vllm.__version__,
            ", ".join(v + "x" for v in FIXED_VLLM),
        )
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
    return True


def register() -> None:
    """vLLM's plugin hook (entry point `vllm.general_plugins`, run in each vLLM process): the fix,
    unless `LORAFLEET_ENGINE_FIXES` is off."""
    from lorafleet.serve.settings import Settings

    if Settings().engine_fixes:
        apply()
