"""The gateway's fleet without engines: what it reads from a replica's /metrics, where it places
requests as replicas come, go and fill up, and how discovery turns host names into replicas.
(With real engines: tests/serve/test_fleet_engines.py.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lorafleet.adapters.store import LocalStore
from lorafleet.errors import EngineUnavailable
from lorafleet.serve.engine.client import EngineClient
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.sizing import Workload, derive_sizing
from lorafleet.serve.engine.supervisor import EngineSupervisor
from lorafleet.serve.fleet.fleet import EngineReplica, Fleet, parse_engine_metrics
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings
from tests.serve.engine.test_resize import MACHINE, SHAPE

DIGESTS = [hashlib.sha256(f"adapter-{i}".encode()).hexdigest() for i in range(40)]

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="lorafleet-base"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="lorafleet-base"} 5.0
# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{engine="0",le="0.3",model_name="lorafleet-base"} 7.0
vllm:e2e_request_latency_seconds_count{engine="0",model_name="lorafleet-base"} 9.0
# HELP lorafleet_node_info What this lorafleet engine node is: hardware, quantization, sizing
# TYPE lorafleet_node_info gauge
lorafleet_node_info{hardware="NVIDIA H200 (compute capability 9.0)",\
max_loras="8",max_num_seqs="256"} 1.0
"""


def test_the_queue_and_the_node_description_are_read_from_vllm_metrics():
    running, waiting, node = parse_engine_metrics(VLLM_METRICS)
    assert (running, waiting) == (3, 5)
    assert node == {
        "hardware": "NVIDIA H200 (compute capability 9.0)",
        "max_loras": "8",
        "max_num_seqs": "256",
    }
    assert parse_engine_metrics("# nothing of ours\nprocess_cpu_seconds_total 1.0\n") == (0, 0, {})


def _replica(
    tmp_path: Path,
    settings: Settings,
    metrics: Metrics,
    name: str,
    kind: str = "supervised",
    up: bool = True,
) -> EngineReplica:
    client = EngineClient(LocalStore(tmp_path / "adapters"), metrics, by_digest=kind == "node")
    supervisor = EngineSupervisor(
        settings,
        client,
        metrics,
        tmp_path / f"{name}.log",
        Hardware("x86_64"),
        Quantization("none"),
        derive_sizing(settings, Workload(), MACHINE, SHAPE),
        attached=kind != "supervised",
    )
    if up:
        client.mark_up()
    return EngineReplica(name, kind, client, supervisor)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    settings = Settings(base="x", home=tmp_path, max_num_seqs=4)
    metrics = Metrics()
    return Fleet(
        settings, metrics, [_replica(tmp_path, settings, metrics, f"engine-{i}") for i in range(2)]
    )


def test_each_adapter_goes_to_its_home_replica_and_both_replicas_get_a_share(fleet):
    served = {digest: fleet.place(digest).name for digest in DIGESTS}
    assert all(served[d] == fleet.home_replica(d) for d in DIGESTS)
    assert set(served.values()) == {"engine-0", "engine-1"}
    assert fleet.placed == len(DIGESTS) and fleet.spills == 0
    assert sum(r.placed for r in fleet.replicas) == len(DIGESTS)


def test_a_replica_at_its_load_bound_spills_to_the_other(fleet):
    digest = DIGESTS[0]
    home = fleet.replicas[0] if fleet.home_replica(digest) == "engine-0" else fleet.replicas[1]
    home.others = 10  # other gateways' requests, as its last scrape said
    assert fleet.place(digest).name != home.name
    assert fleet.spills == 1
    home.others = 0
    for replica in fleet.replicas:
        replica.in_flight = 0
    # this gateway's own requests count
    assert fleet.place(digest) is home and fleet.place(digest) is home
    # at once: 2 on it is the bound for a total of 2 on 2 replicas
    assert fleet.place(digest) is not home
    fleet.release(home, digest)
    fleet.release(home, digest)  # and until they end
    assert home.in_flight == 0 and fleet.place(digest) is home


def test_a_replica_that_does_not_answer_leaves_placement_and_requests_fail_over_once(fleet):
    digest = DIGESTS[0]
    home = fleet.place(digest)
    fleet.mark_unreachable(home)
    assert not home.routable and fleet.up
    other = fleet.place(digest)
    assert other is not home
    assert fleet.fail_over([home.name]) and fleet.failovers == 1
    fleet.mark_unreachable(other)
    assert not fleet.fail_over([home.name])  # nobody else is up: the request's own error goes back
    with pytest.raises(EngineUnavailable):
        fleet.place(digest)
    assert fleet.state != "up"


async def test_after_a_start_a_replica_registers_only_the_adapters_whose_home_it_is(fleet):
    registered: dict[str, list[str]] = {"engine-0": [], "engine-1": []}
    for replica in fleet.replicas:

        async def record(digest: str, name: str = replica.name) -> None:
            registered[name].append(digest)

        replica.client.ensure_loaded = record  # type: ignore[method-assign]  # what would be sent to vLLM
        await fleet.register_home(replica, DIGESTS)
    assert sorted(registered["engine-0"] + registered["engine-1"]) == sorted(DIGESTS)  # each once
    assert all(
        fleet.home_replica(d) == name for name, digests in registered.items() for d in digests
    )


def test_the_fair_queue_holds_what_every_replica_batches(fleet, tmp_path):
    assert fleet.slots() == 2 * fleet.replicas[0].supervisor.sizing.max_num_seqs == 8
    node = _replica(tmp_path, fleet.settings, fleet.metrics, "10.0.0.7:8100", kind="node")
    assert node.slots == 0  # a node says its batch size on its /metrics; not scraped yet
    node.node = {"max_num_seqs": "256"}
    fleet.replicas.append(node)
    assert fleet.slots() == 8 + 256


async def test_discovery_makes_a_replica_of_every_address_and_drops_vanished_ones(tmp_path):
    settings = Settings(
        base="x", home=tmp_path, engines="http://127.0.0.1:8101,http://localhost:8102"
    )
    metrics = Metrics()
    made: list[str] = []

    def node(name: str, url: str) -> EngineReplica:
        made.append(url)
        return _replica(tmp_path, settings, metrics, name, kind="node", up=False)

    fleet = Fleet(settings, metrics, [], new_node=node)
    await fleet._discover()
    names = {r.name for r in fleet.replicas}
    assert {"127.0.0.1:8101", "127.0.0.1:8102"} <= names  # localhost: each of its addresses
    assert "http://127.0.0.1:8101" in made and all(r.client.by_digest for r in fleet.replicas)
    fleet.settings = settings.model_copy(update={"engines": ["http://127.0.0.1:8101"]})
    await fleet._discover()
    assert [r.name for r in fleet.replicas] == ["127.0.0.1:8101"]
    fleet.settings = settings.model_copy(
        update={"engines": ["http://127.0.0.1:8101", "http://no-such-host.invalid:1"]}
    )
    await fleet._discover()  # a name that does not resolve adds nothing and removes nothing
    assert [r.name for r in fleet.replicas] == ["127.0.0.1:8101"]


def test_settings_name_one_source_of_engines():
    with pytest.raises(ValueError, match="choose one of"):
        Settings(replicas=2, engines="http://e:8100")
    with pytest.raises(ValueError, match="http"):
        Settings(engines="e:8100")
    with pytest.raises(ValueError, match="unknown placement policy"):
        Settings(placement_policy="nearest")
    assert Settings(engines='["http://a:1", "http://b:2/"]').engines == ["http://a:1", "http://b:2"]


@pytest.mark.heavy_imports
def test_a_gateway_in_front_of_nodes_records_a_quantization_only_the_nodes_can_run(tmp_path):
    import json

    from lorafleet.errors import UnsupportedQuantization
    from lorafleet.serve.engine.hardware import detect_hardware
    from lorafleet.serve.gateway import _quantization
    from tests.test_kubernetes import TINY_BASE_CONFIG

    if detect_hardware().gpu is not None:
        pytest.skip("fp8 runs on this machine's GPU")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    # fp8 is for GPUs: a gateway that would run it refuses
    with pytest.raises(UnsupportedQuantization):
        _quantization(Settings(base=str(base), home=tmp_path, quantize="fp8"))
    _, planned = _quantization(
        Settings(base=str(base), home=tmp_path, quantize="fp8", engines="http://e:8100")
    )
    assert planned.label == "fp8 (planned on the engine nodes)" and not planned.engine_args


def _registered(replica: EngineReplica, *digests: str) -> None:
    """What `ensure_loaded` leaves after vLLM said yes (registered, then in both caches)."""
    for digest in digests:
        replica.client._loaded.add(digest)
        replica.client._used(digest, registering=True)
        replica.registered |= {digest}


def _cold_loads(fleet: Fleet, replica: EngineReplica) -> float:
    return (
        fleet.metrics.registry.get_sample_value(
            "lorafleet_adapter_cold_loads_total", {"replica": replica.name}
        )
        or 0.0
    )


async def test_a_replica_holds_what_its_engine_was_sized_for_and_a_pushed_out_adapter_is_cold(
    fleet,
):
    replica = fleet.replicas[0]
    sizing = replica.supervisor.sizing
    caches = replica.client.residency
    assert (caches.cpu_capacity, caches.gpu_capacity) == (sizing.max_cpu_loras, sizing.max_loras)
    caches.resize(cpu_capacity=2, gpu_capacity=1)
    _registered(replica, *DIGESTS[:3])  # the first was pushed out of memory by the third
    assert not replica.has(DIGESTS[0]) and replica.has(DIGESTS[1]) and replica.has(DIGESTS[2])
    assert caches.tier(DIGESTS[2]) == "gpu" and caches.tier(DIGESTS[1]) == "cpu"
    await replica.client.ensure_loaded(DIGESTS[0])  # still registered: no load, but a cold one
    assert _cold_loads(fleet, replica) == 1 and replica.has(DIGESTS[0])
    assert (
        fleet.metrics.registry.get_sample_value(
            "lorafleet_adapter_evictions_total", {"replica": replica.name, "tier": "cpu"}
        )
        == 2
    )  # the first, then the second
    described = replica.describe()["resident"]
    assert described == {"gpu": [DIGESTS[0]], "cpu": [DIGESTS[2], DIGESTS[0]]}


def test_placement_prefers_a_replica_where_the_adapter_is_resident_not_merely_registered(fleet):
    digest = DIGESTS[0]
    home = next(r for r in fleet.replicas if r.name == fleet.home_replica(digest))
    other = next(r for r in fleet.replicas if r is not home)
    _registered(other, digest)
    assert fleet.place(digest) is other  # in memory there: no read from disk
    fleet.release(other, digest)
    other.client.residency.forget(digest)  # pushed out of its memory since
    assert other.has(digest) is False and fleet.place(digest) is home


async def test_a_stray_copy_is_unloaded_once_idle_while_its_home_is_up_and_holds_it(fleet):
    fleet.settings = fleet.settings.model_copy(update={"stray_adapter_idle_s": 30.0})
    digest = DIGESTS[0]
    home = next(r for r in fleet.replicas if r.name == fleet.home_replica(digest))
    stray = next(r for r in fleet.replicas if r is not home)
    _registered(stray, digest)  # it came while the home was down
    used_at = stray.client.residency.idle_since(digest)
    assert used_at is not None
    assert fleet.strays(now=used_at + 60) == []  # the home does not hold it: the copy serves
    _registered(home, digest)  # the home came up and registered its adapters
    assert fleet.strays(now=used_at + 10) == []  # not idle long enough
    assert fleet.place(digest) is home  # requests go home now
    fleet.release(home, digest)
    stray.in_use[digest] += 1  # a request still running on the copy
    assert fleet.strays(now=used_at + 60) == []
    stray.in_use.clear()
    assert fleet.strays(now=used_at + 60) == [(stray, digest)]
    home.client.mark_down()  # the home went down again: the copy is the one that serves
    assert fleet.strays(now=used_at + 60) == []

    unloaded = []

    async def unload(d: str) -> None:
        unloaded.append(d)
        stray.client.residency.forget(d)
        stray.client._loaded.discard(d)

    home.client.mark_up()
    _registered(home, digest)
    stray.client.unload = unload  # type: ignore[method-assign]  # what would be sent to vLLM
    fleet.settings = fleet.settings.model_copy(update={"stray_adapter_idle_s": 0.0})
    await fleet.unload_strays()
    assert unloaded == [digest] and fleet.strays() == []
    assert (
        fleet.metrics.registry.get_sample_value(
            "lorafleet_adapter_stray_unloads_total", {"replica": stray.name}
        )
        == 1
    )
