"""A gateway in front of two real engines: two it supervises (`replicas=2`), and two `lorafleet
engine` nodes that fetch adapters from an S3 store themselves (`engines=URL,URL`). In both: while
load is low each adapter is served by one replica only; killing a replica under load fails no
non-streaming request; the replica comes back and is served again; `/admin/engines` says what
each replica really has (from the engines' own /metrics and models)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lorafleet.serve.dev.local_server import LocalServer
from lorafleet.serve.fleet.placement import HashRing
from tests.conftest import NEAR_BASE_STD
from tests.engine_nodes import ENGINE, Nodes, with_group
from tests.helpers import image_messages, poll_until, upload_folder

pytestmark = pytest.mark.engine

ADAPTERS = 4


class Setup:
    """A gateway, its admin and tenant clients, the deployments d0..d3 with their digests, and
    how to kill and bring back one replica."""

    def __init__(
        self, gateway: LocalServer, kill: Callable[[dict], None], revive: Callable[[dict], None]
    ) -> None:
        self.gateway, self.kill, self.revive = gateway, kill, revive
        self.admin = httpx.Client(
            base_url=gateway.url,
            headers={"Authorization": f"Bearer {gateway.admin_key}"},
            timeout=60,
        )
        key = self.admin.post("/admin/tenants", json={"name": "fleet"}).json()["api_key"]
        self.tenant = httpx.Client(
            base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=300
        )
        self.digests: dict[str, str] = {}

    def engines(self) -> dict:
        response = self.admin.get("/admin/engines")
        assert response.status_code == 200, response.text
        return response.json()

    def replicas(self) -> dict[str, dict]:
        return {replica["name"]: replica for replica in self.engines()["replicas"]}

    def chat(self, deployment: str, timeout: float = 300) -> httpx.Response:
        return self.tenant.post(
            "/v1/chat/completions",
            timeout=timeout,
            json={
                "model": deployment,
                "messages": image_messages(),
                "max_tokens": 4,
                "temperature": 0,
            },
        )


@contextlib.contextmanager
def _supervised(base: Path, tmp: pytest.TempPathFactory) -> Iterator[Setup]:
    gateway = LocalServer.start(
        base,
        tmp.mktemp("fleet-replicas"),
        replicas="2",
        fleet_scrape_s="0.5",
        stray_adapter_idle_s="2",
        **ENGINE,
    )

    def kill(replica: dict) -> None:
        # vLLM's whole process group, as a crash or OOM kill does
        with_group(replica["pid"], signal.SIGKILL)

    try:
        gateway.wait_ready()
        poll_until(lambda: _all_up(gateway), 600, "both replicas up")
        yield Setup(gateway, kill, lambda _: None)  # the gateway restarts its own engines
    finally:
        gateway.stop()


@contextlib.contextmanager
def _nodes(base: Path, tmp: pytest.TempPathFactory, nodes: Nodes) -> Iterator[Setup]:
    engines = nodes.nodes
    gateway = LocalServer.start(
        base,
        tmp.mktemp("fleet-gateway"),
        store_url=nodes.store_url,
        engine_api_key=nodes.token,
        fleet_scrape_s="0.5",
        engines=",".join(f"http://{name}" for name in engines),
        **ENGINE,
    )
    try:
        gateway.wait_ready()
        poll_until(lambda: _all_up(gateway), 600, "both nodes up")
        yield Setup(
            gateway,
            lambda replica: engines[replica["name"]].kill(),
            lambda replica: engines[replica["name"]].restart(),
        )
    finally:
        gateway.stop()


def _all_up(gateway: LocalServer) -> bool:
    engines = httpx.get(
        gateway.url + "/admin/engines", headers={"Authorization": f"Bearer {gateway.admin_key}"}
    )
    return (
        engines.status_code == 200
        and len(engines.json()["replicas"]) == 2
        and all(r["up"] for r in engines.json()["replicas"])
    )


@pytest.fixture(scope="module", params=["supervised", "nodes"])
def setup(
    request, tiny_model: Path, make_adapter, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    """One fleet at a time (the second starts once the first is gone), with d0..d3 deployed: two
    adapters whose home is one replica and two the other's (digests differ per test session, as
    the base's path is in each adapter's config, so they are picked by the ring, as the gateway
    computes it)."""
    started = (
        _supervised(tiny_model, tmp_path_factory)
        if request.param == "supervised"
        else _nodes(tiny_model, tmp_path_factory, request.getfixturevalue("engine_nodes"))
    )
    with started as fleet:
        ring = HashRing(list(fleet.replicas()))
        homes: dict[str, int] = {}
        for seed in range(40, 72):
            version = upload_folder(
                fleet.tenant, f"a{seed}", make_adapter(seed, 8, std=NEAR_BASE_STD)
            )
            home = ring.home(version["digest"])
            if homes.get(home, 0) == ADAPTERS // 2:
                continue
            homes[home] = homes.get(home, 0) + 1
            name = f"d{len(fleet.digests)}"
            deployed = fleet.tenant.put(f"/v1/deployments/{name}", json={"adapter": f"a{seed}@1"})
            assert deployed.status_code == 200, deployed.text
            fleet.digests[name] = version["digest"]
            if len(fleet.digests) == ADAPTERS:
                break
        assert len(fleet.digests) == ADAPTERS, homes
        yield fleet


def _holders(fleet: Setup) -> dict[str, list[str]]:
    """Each deployment's adapter: the replicas that have it registered."""
    replicas = fleet.replicas()
    return {
        name: sorted(r for r, replica in replicas.items() if digest in replica["adapters"])
        for name, digest in fleet.digests.items()
    }


def test_under_low_load_each_adapter_is_served_by_one_replica_and_admin_engines_tells_the_truth(
    setup,
):
    for _ in range(3):
        for deployment in setup.digests:
            answered = setup.chat(deployment)
            assert answered.status_code == 200, answered.text
    engines = setup.engines()
    assert engines["policy"] == "bounded_affinity"

    def scraped() -> dict[str, list[str]] | None:
        holders = _holders(setup)
        return holders if all(holders.values()) else None

    holders = poll_until(scraped, 10, "every adapter scraped")
    # one replica each: affinity
    assert all(len(replicas) == 1 for replicas in holders.values()), holders
    # and both replicas have some
    assert len({replicas[0] for replicas in holders.values()}) == 2, holders
    poll_until(
        lambda: all(r["running"] == r["waiting"] == 0 for r in setup.engines()["replicas"]),
        10,
        # (the last scrape may have seen the last request running)
        "idle, as vLLM's /metrics says",
    )
    for replica in engines["replicas"]:
        assert replica["up"] and replica["state"] == "up"
        assert "CPU" in replica["hardware"] and replica["max_num_seqs"] == 4, replica
        assert replica["placed"] >= 3 * sum(replica["name"] in h for h in holders.values())
    assert engines["spills"] == 0
    metrics = setup.admin.get("/metrics").text
    assert (
        'lorafleet_replica_up{replica="' in metrics
        and "lorafleet_placement_spills_total 0.0" in metrics
    )
    listed = subprocess.run(
        [sys.executable, "-m", "lorafleet.serve.cli", "engines", "--url", setup.gateway.url],
        env={**os.environ, "LORAFLEET_ADMIN_KEY": setup.gateway.admin_key, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert all(replica["name"] in listed.stdout for replica in engines["replicas"]), listed.stdout
    assert "bounded_affinity" in listed.stdout


def test_killing_a_replica_under_load_fails_no_request_and_it_rejoins(setup):
    victim = setup.replicas()[sorted(setup.replicas())[1]]
    homed = [d for d, replicas in _holders(setup).items() if replicas == [victim["name"]]]
    assert homed, "the victim serves no adapter"
    statuses: list[int] = []
    stop = threading.Event()

    def client(offset: int) -> None:
        i = offset
        while not stop.is_set():
            response = setup.chat(f"d{i % ADAPTERS}")
            statuses.append(response.status_code)
            assert response.status_code == 200, response.text
            i += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        poll_until(lambda: len(statuses) >= 8, 120, "requests under way")
        failovers_before = setup.engines()["failovers"]
        setup.kill(victim)
        killed_at = len(statuses)
        poll_until(
            lambda: not setup.replicas()[victim["name"]]["up"], 30, "the victim out of placement"
        )
        poll_until(lambda: len(statuses) >= killed_at + 12, 300, "requests served by the survivor")
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    assert statuses and set(statuses) == {200}, statuses  # not one request failed
    # some were in flight on the victim, and sent again
    assert setup.engines()["failovers"] > failovers_before

    setup.revive(victim)
    poll_until(lambda: setup.replicas()[victim["name"]]["up"], 600, "the replica rejoins")
    # it registers the adapters whose home it is just after it is up (until then the survivor's
    # copies in memory serve them)
    poll_until(
        lambda: all(
            setup.digests[d] in setup.replicas()[victim["name"]]["resident"]["cpu"] for d in homed
        ),
        30,
        "its adapters registered on it again",
    )
    before = setup.replicas()[victim["name"]]["placed"]
    for deployment in homed:
        assert setup.chat(deployment).status_code == 200
    back = setup.replicas()[victim["name"]]
    assert back["placed"] >= before + len(homed)  # its adapters go home again
    # the copies the survivor took while the victim was down are unloaded once idle there: each
    # adapter is resident on one replica again, its home
    survivor = next(name for name in setup.replicas() if name != victim["name"])
    poll_until(
        lambda: all(_holders(setup)[d] == [victim["name"]] for d in homed),
        60,
        "the survivor's stray copies unloaded",
    )
    engines = setup.replicas()
    for d in homed:
        assert setup.digests[d] not in engines[survivor]["resident"]["cpu"]
        assert setup.digests[d] in engines[victim["name"]]["resident"]["cpu"]
    metrics = setup.admin.get("/metrics").text
    assert f'lorafleet_adapter_stray_unloads_total{{replica="{survivor}"}}' in metrics
    assert f'lorafleet_adapter_resident{{replica="{victim["name"]}",tier="gpu"}}' in metrics
