"""lorafleet's fix to vLLM's adapter lookup: an adapter in memory is found with one lookup and
treated as vLLM treats it; everything else goes through vLLM's own method. (The engine tests run
every real adapter with the fix on, its default.)"""

from __future__ import annotations

from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Gauge

from lorafleet.serve.engine import vllm_fixes

pytestmark = pytest.mark.heavy_imports  # vLLM, imported by the tests, not at collection


@pytest.fixture(scope="module")
def vl() -> SimpleNamespace:
    """The vLLM parts the fix touches (importing vLLM takes seconds: only the worker that runs
    these tests pays it)."""
    import vllm
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager
    from vllm.utils.cache import LRUCache
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    return SimpleNamespace(
        vllm=vllm,
        LoRARequest=LoRARequest,
        Worker=LRUCacheWorkerLoRAManager,
        LRUCache=LRUCache,
        StatLogger=PrometheusStatLogger,
    )


class Manager:
    """What the fixed path reads of vLLM's LRUCacheLoRAModelManager (tests only)."""

    def __init__(self, vl: SimpleNamespace, ids: list[int]) -> None:
        self._registered_adapters = vl.LRUCache(len(ids))
        for i in ids:
            self._registered_adapters[i] = f"adapter {i}"
        self.activated: list[int] = []
        self.listed = 0

    def list_adapters(self) -> dict:
        self.listed += 1
        return dict(self._registered_adapters.cache)

    def get_adapter(self, adapter_id: int):
        return self._registered_adapters.get(adapter_id)

    def activate_adapter(self, adapter_id: int) -> bool:
        self.activated.append(adapter_id)
        return True


@pytest.fixture
def released(monkeypatch, vl):
    """vLLM's method replaced by a recorder (restored afterwards), then the fix applied over it."""
    calls: list[int] = []

    def add_adapter(self, lora_request) -> bool:
        calls.append(lora_request.lora_int_id)
        return True

    monkeypatch.setattr(vl.Worker, "add_adapter", add_adapter)
    monkeypatch.setattr(vl.StatLogger, "__init__", vl.StatLogger.__init__)
    assert vllm_fixes.apply()
    return calls


def _worker(vl: SimpleNamespace, manager: Manager):
    worker = object.__new__(vl.Worker)
    worker._adapter_manager = manager
    return worker


def _request(vl: SimpleNamespace, lora_id: int, inplace: bool = False):
    return vl.LoRARequest(f"a{lora_id}", lora_id, "/nowhere", load_inplace=inplace)


def test_an_adapter_in_memory_is_found_without_copying_the_cache(released, vl):
    manager = Manager(vl, [1, 2, 3])
    assert _worker(vl, manager).add_adapter(_request(vl, 1)) is True
    assert manager.listed == 0 and released == []
    assert manager.activated == [1]
    # touched: 1 is now the most recently used, so a fourth pushes 2 out
    manager._registered_adapters[4] = "adapter 4"
    assert set(manager._registered_adapters.keys()) == {1, 3, 4}


def test_a_new_adapter_or_an_in_place_reload_goes_through_vllm(released, vl):
    manager = Manager(vl, [1])
    worker = _worker(vl, manager)
    worker.add_adapter(_request(vl, 5))
    worker.add_adapter(_request(vl, 1, inplace=True))
    assert released == [5, 1] and manager.activated == []


def test_applied_once(released, vl):
    fixed = vl.Worker.add_adapter
    assert vllm_fixes.apply() and vl.Worker.add_adapter is fixed


def test_another_vllm_runs_as_released(monkeypatch, caplog, vl):
    original = vl.Worker.add_adapter
    monkeypatch.setattr(vl.vllm, "__version__", "0.99.0")
    if getattr(original, "_lorafleet_fix", False):
        pytest.skip("this process already runs the fix")
    assert not vllm_fixes.apply()
    assert vl.Worker.add_adapter is original
    assert "runs as released" in caplog.text


def test_vllm_runs_the_hook_in_each_of_its_processes():
    hooks = {e.value for e in entry_points(group="vllm.general_plugins")}
    assert "lorafleet.serve.engine.vllm_fixes:register" in hooks


def test_the_hook_respects_the_setting(monkeypatch):
    applied: list[bool] = []
    monkeypatch.setattr(vllm_fixes, "apply", lambda: applied.append(True) or True)
    monkeypatch.setenv("LORAFLEET_ENGINE_FIXES", "false")
    vllm_fixes.register()
    assert applied == []
    monkeypatch.setenv("LORAFLEET_ENGINE_FIXES", "true")
    vllm_fixes.register()
    assert applied == [True]


def test_the_adapter_gauge_keeps_the_latest_combination_only(released, vl):
    registry = CollectorRegistry()
    gauge = vllm_fixes.LatestSeriesOnly(
        Gauge("lora_requests_info", "", ["running", "waiting"], registry=registry)
    )
    for running in ("a", "a,b", "b", "b"):
        gauge.labels(running=running, waiting="").set_to_current_time()
    series = [s.labels for m in registry.collect() for s in m.samples]
    assert series == [{"running": "b", "waiting": ""}]
    # vLLM's stat logger gets it wherever it makes the gauge
    assert vl.StatLogger.__init__.__qualname__.endswith("__init__")
    assert vl.StatLogger.__init__.__module__ == vllm_fixes.__name__
