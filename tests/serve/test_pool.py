"""The pool upstream without engines: its settings, the fleet of one replica that places nothing,
the headers each request carries, and the residency series an engine node publishes from its
worker's snapshot. (With real engine nodes behind a stand-in pool: test_pool_upstream.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.adapters.store import LocalStore
from lorafleet.errors import EngineUnavailable
from lorafleet.serve.engine.client import EngineClient, Objectives
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.loaded_adapters import ResidencyCollector
from lorafleet.serve.engine.sizing import Workload, derive_sizing
from lorafleet.serve.fleet.fleet import POOL_SLOTS, open_fleet
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings
from tests.serve.engine.test_resize import MACHINE, SHAPE

DIGEST = "ab" * 32


def test_a_pool_excludes_every_other_engine_source_and_is_an_http_url():
    for other in (
        {"replicas": 2},
        {"engines": "http://e:8100"},
        {"engine_url": "http://e:8100"},
    ):
        with pytest.raises(ValueError, match="pool_url"):
            Settings(pool_url="http://gateway", **other)
    with pytest.raises(ValueError, match="http"):
        Settings(pool_url="gateway:80")
    assert Settings(pool_url="https://inference-gateway/").pool_url == "https://inference-gateway"
    with pytest.raises(ValueError, match="InferenceObjective"):
        Settings(pool_objective="Critical_Tier")
    assert Settings(pool_objective="lorafleet-critical").pool_objective == "lorafleet-critical"


def _pool_fleet(tmp_path: Path, **settings: str):
    configured = Settings(base="x", home=tmp_path, pool_url="http://127.0.0.1:9", **settings)
    fleet = open_fleet(
        configured,
        LocalStore(tmp_path / "adapters"),
        Metrics(),
        Hardware("x86_64"),
        Quantization("none"),
        derive_sizing(configured, Workload(), MACHINE, SHAPE),
        lambda: None,  # type: ignore[arg-type,return-value]  # (never started here)
    )
    return fleet


async def test_a_pool_is_one_replica_that_places_loads_and_loses_nothing(tmp_path: Path):
    fleet = _pool_fleet(tmp_path)
    (pool,) = fleet.replicas
    assert (pool.name, pool.kind, pool.client.url) == ("pool", "pool", "http://127.0.0.1:9")
    assert fleet.pool and pool.client.by_digest
    with pytest.raises(EngineUnavailable):  # not asked yet
        fleet.place(DIGEST)
    pool.client.mark_up()
    assert fleet.place(DIGEST) is pool
    # a request that reached no pod goes once more to the pool, which stays in placement
    fleet.mark_unreachable(pool)
    assert pool.routable and fleet.fail_over(["pool"]) and fleet.failovers == 1
    assert fleet.place(DIGEST, exclude=["pool"]) is pool
    # nothing is loaded through it (its address answers nothing here: a request would fail)
    await pool.client.ensure_loaded(DIGEST)
    await fleet.preload([DIGEST])
    await pool.client.unload(DIGEST)
    assert not pool.client.loaded
    assert await pool.client.warm_up(5) is None
    assert fleet.slots() == POOL_SLOTS
    assert pool.describe()["kind"] == "pool"
    await pool.client.aclose()


def test_requests_to_a_pool_say_whose_they_are_and_their_objective(tmp_path: Path):
    pool = _pool_fleet(
        tmp_path, pool_objective="lorafleet-standard", pool_replay_objective="lorafleet-replay"
    ).replicas[0]
    assert pool.client.flow_headers("acme") == {
        "x-gateway-inference-fairness-id": "acme",
        "x-llm-d-inference-fairness-id": "acme",
        "x-gateway-inference-objective": "lorafleet-standard",
        "x-llm-d-inference-objective": "lorafleet-standard",
    }
    assert pool.client.flow_headers("acme", "lorafleet-critical")[
        "x-gateway-inference-objective"
    ] == ("lorafleet-critical")
    assert pool.client.flow_headers("acme", replay=True)["x-llm-d-inference-objective"] == (
        "lorafleet-replay"
    )
    # no default objective: no objective header (the pool's default priority)
    bare = EngineClient(LocalStore(tmp_path / "a"), Metrics(), url="http://p", pool=Objectives())
    assert bare.flow_headers("acme") == dict.fromkeys(
        ("x-gateway-inference-fairness-id", "x-llm-d-inference-fairness-id"), "acme"
    )
    # lorafleet's own engines are told nothing
    own = EngineClient(LocalStore(tmp_path / "b"), Metrics(), url="http://e")
    assert own.flow_headers("acme", "lorafleet-critical") == {}


def test_a_pool_without_its_own_replay_objective_replays_under_the_live_one(tmp_path: Path):
    pool = _pool_fleet(tmp_path, pool_objective="lorafleet-standard").replicas[0]
    assert pool.client.pool == Objectives("lorafleet-standard", "lorafleet-standard")


def _scrape(collector: ResidencyCollector) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        family.name: [(s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_a_nodes_residency_is_published_as_vllm_proposes_it(tmp_path: Path):
    path = tmp_path / "residency.json"
    collector = ResidencyCollector(path, "lorafleet-base")
    before = _scrape(collector)  # the worker has written nothing yet
    assert before["vllm:lora_adapter_loaded"] == []
    assert before["vllm:num_gpu_loaded_lora_adapters"] == [({"model_name": "lorafleet-base"}, 0)]
    snapshot = {
        "adapters": [
            {"name": "a" * 64, "level": "gpu", "pinned": False, "rank": 8},
            {"name": "b" * 64, "level": "cpu", "pinned": True, "rank": 16},
            {"name": "c" * 64, "level": "cpu", "pinned": False, "rank": 8},
        ],
        "max_gpu": 2,
        "max_cpu": 12,
    }
    path.write_text(json.dumps(snapshot))
    metrics = _scrape(collector)
    assert sorted(
        (labels["adapter_name"][0], labels["level"], labels["pinned"], labels["rank"], value)
        for labels, value in metrics["vllm:lora_adapter_loaded"]
    ) == [
        ("a", "gpu", "false", "8", 1),
        ("b", "cpu", "true", "16", 1),
        ("c", "cpu", "false", "8", 1),
    ]
    assert {labels["model_name"] for labels, _ in metrics["vllm:lora_adapter_loaded"]} == {
        "lorafleet-base"
    }
    counts = {
        name: metrics[f"vllm:{name}"][0][1]
        for name in (
            "num_gpu_loaded_lora_adapters",
            "num_cpu_loaded_lora_adapters",
            "max_gpu_lora_adapters",
            "max_cpu_lora_adapters",
        )
    }
    assert counts == {
        "num_gpu_loaded_lora_adapters": 1,
        "num_cpu_loaded_lora_adapters": 2,
        "max_gpu_lora_adapters": 2,
        "max_cpu_lora_adapters": 12,
    }
    # an evicted adapter's series is gone with the next snapshot
    snapshot["adapters"] = snapshot["adapters"][:1]
    path.write_text(json.dumps(snapshot))
    path.touch()
    names = [labels["adapter_name"] for labels, _ in _scrape(collector)["vllm:lora_adapter_loaded"]]
    assert names == ["a" * 64]
