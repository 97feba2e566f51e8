"""The gateway's engines: one or many vLLM replicas, each with its client and its supervision, and
which one serves a request.

Where the replicas come from (settings; one of them):

    default            one engine the gateway starts and supervises on loopback (`engine-0`)
    replicas N         N such engines (development, CI, a multi-GPU box: one GPU each)
    engines URL,...    engine nodes (`lorafleet engine`) elsewhere; every URL's host name is
                       resolved again every `fleet_discovery_s`, and each address it has is a
                       replica (a headless Service names every pod)
    engine_url URL     one engine beside the gateway that reads the gateway's folders
                       (attached, as before)
    pool_url URL       an InferencePool (llm-d, the Gateway API Inference Extension) in front of
                       engine nodes: one upstream (`pool`) that places every request itself; the
                       gateway scrapes, places and loads nothing, and sends a request that reached
                       no pod once more

What the gateway knows of each replica comes from the replica: every `fleet_scrape_s` it reads
vLLM's `/metrics` (requests running and waiting, and an engine node's `lorafleet_node_info`:
hardware, quantization, batch size) and `/v1/models` (the adapters registered on it). A replica that
refuses a connection (at a scrape or under a request) leaves placement at once and returns with its
next answered scrape; its supervision restarts it (local) or follows its health and registers
adapters when it is back (nodes). Placement (`lorafleet.serve.fleet.placement`) sees each replica's
requests from this gateway now, plus the other gateways' as its last scrape showed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lorafleet.adapters.store import AdapterStore
from lorafleet.errors import EngineUnavailable
from lorafleet.serve.engine.client import EngineClient, Objectives
from lorafleet.serve.engine.hardware import Hardware, Quantization
from lorafleet.serve.engine.residency import TIERS
from lorafleet.serve.engine.sizing import EngineSizing, Workload
from lorafleet.serve.engine.supervisor import ENGINE_STATES, EngineSupervisor
from lorafleet.serve.fleet.placement import (
    HashRing,
    Placement,
    PlacementPolicy,
    Replica,
    make_policy,
)
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.settings import Settings

__all__ = ["EngineReplica", "Fleet", "open_fleet", "parse_engine_metrics"]

log = logging.getLogger("lorafleet.fleet")

# a pool queues and sheds requests itself: the fair queue in front of it only shares this many
# between tenants, unless `engine_slots` says otherwise
POOL_SLOTS = 1024
_SCRAPED = ("vllm:num_requests_running", "vllm:num_requests_waiting", "lorafleet_node_info")
_SCRAPE_TIMEOUT_S = 5.0


def parse_engine_metrics(text: str) -> tuple[int, int, dict[str, str]]:
    """Requests running and waiting, and the node's info labels, from a vLLM `/metrics` page
    (only the few lines read are parsed: the page holds hundreds of histogram lines)."""
    lines = "\n".join(line for line in text.splitlines() if line.startswith(_SCRAPED))
    running = waiting = 0.0
    info: dict[str, str] = {}
    for family in text_string_to_metric_families(lines + "\n"):
        for sample in family.samples:
            if sample.name == "vllm:num_requests_running":
                running += sample.value
            elif sample.name == "vllm:num_requests_waiting":
                waiting += sample.value
            elif sample.name == "lorafleet_node_info":
                info = dict(sample.labels)
    return int(running), int(waiting), info


@dataclass(eq=False)
class EngineReplica:
    """One engine of the fleet: how to reach it, who watches it, and what its last scrape said."""

    name: str
    # supervised (this gateway starts it) | node (`lorafleet engine`) | attached (`engine_url`) |
    # pool (`pool_url`)
    kind: str
    client: EngineClient
    supervisor: EngineSupervisor
    running: int = 0  # vLLM's numbers at the last scrape: every gateway's requests
    waiting: int = 0
    registered: frozenset[str] = frozenset()  # adapter digests the engine lists (/v1/models)
    in_flight: int = 0  # this gateway's requests on it now (exact, at once)
    # the other gateways' requests on it at the last scrape: its queue less ours then
    others: int = 0
    reachable: bool = True  # False from a refused connection until a scrape answers
    scraped_at: float | None = None  # wall-clock time of the last answered scrape
    # an engine node's own description (lorafleet_node_info)
    node: dict[str, str] = field(default_factory=dict)
    placed: int = 0  # requests placed here by this gateway
    source: str = ""  # the `engines` URL discovery found it under
    # this gateway's requests on it now, by adapter (a copy in use is never unloaded)
    in_use: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.client.name = self.name
        self.size_caches()

    def size_caches(self) -> None:
        """The engine's adapter caches as big as it was started with (a node says so on its
        /metrics: unknown until scraped)."""
        if self.kind == "node":
            gpu = int(self.node.get("max_loras") or 0)
            cpu = int(self.node.get("max_cpu_loras") or 0) or gpu
        else:
            gpu = self.supervisor.sizing.max_loras
            cpu = self.supervisor.sizing.max_cpu_loras
        if gpu and cpu:
            self.client.residency.resize(cpu, gpu)

    @property
    def routable(self) -> bool:
        return self.client.up and self.reachable

    @property
    def slots(self) -> int:
        """Sequences its batch holds: a node says so itself; a local engine is sized by this
        gateway."""
        if self.kind == "node":
            return int(self.node.get("max_num_seqs") or 0)
        if self.kind == "pool":
            return POOL_SLOTS
        return self.supervisor.sizing.max_num_seqs

    def has(self, digest: str) -> bool:
        """Whether the adapter is in the engine's memory (registered and not pushed out since:
        the residency model holds only what this gateway registered, and forgets it with it)."""
        return self.client.residency.resident(digest)

    def snapshot(self, digest: str) -> Replica:
        """For placing a request for `digest`: our requests on it now, and the others' as last
        scraped (a scrape lags: requests that ended since would count as load, and those placed
        since would not); of its adapters, only whether it has this one (placement asks nothing
        else, and a replica may have hundreds)."""
        return Replica(
            self.name,
            self.in_flight,
            self.others,
            frozenset((digest,)) if self.has(digest) else frozenset(),
            up=self.routable,
        )

    def describe(self) -> dict[str, Any]:
        """What `/admin/engines` says of it."""
        supervisor = self.supervisor
        state = supervisor.state if self.reachable or not self.client.up else "unreachable"
        local = self.kind not in ("node", "pool")
        return {
            "name": self.name,
            "url": self.client.url,
            "kind": self.kind,
            "state": state,
            "up": self.routable,
            "running": self.running,
            "waiting": self.waiting,
            "adapters": sorted(self.registered | self.client.loaded),
            # in memory and in GPU slots (the gateway's model of vLLM's caches), most recent last
            "resident": {tier: self.client.residency.digests(tier) for tier in TIERS},
            "placed": self.placed,
            "hardware": supervisor.hardware.describe() if local else self.node.get("hardware", "?"),
            "quantization": supervisor.quantization.label
            if local
            else self.node.get("quantization", "?"),
            "max_num_seqs": self.slots,
            "max_loras": supervisor.sizing.max_loras
            if local
            else int(self.node.get("max_loras") or 0),
            "max_cpu_loras": supervisor.sizing.max_cpu_loras
            if local
            else int(self.node.get("max_cpu_loras") or 0),
            "scraped_at": self.scraped_at,
            "pid": supervisor.process.pid if supervisor.process else None,
            "starts": supervisor.starts,
            "last_error": supervisor.last_error,
        }


class Fleet:
    """The replicas, the placement policy over them, and the fleet-wide view the rest of the
    gateway uses (up, registering adapters, replay engines, engine rank)."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        replicas: Sequence[EngineReplica],
        new_node: Callable[[str, str], EngineReplica] | None = None,
    ) -> None:
        """`new_node(name, url)`: a replica for an address discovery found (engine nodes only)."""
        self.settings = settings
        self.metrics = metrics
        self.replicas: list[EngineReplica] = list(replicas)
        self.policy: PlacementPolicy = make_policy(
            settings.placement_policy, load_factor=settings.placement_load_factor
        )
        self._new_node = new_node
        # an InferencePool: its one replica places every request itself
        self.pool = bool(settings.pool_url)
        self._ring: HashRing | None = None
        self._tasks: list[asyncio.Task] = []
        # chat requests placed by this gateway, spilled, sent again
        self.placed = self.spills = self.failovers = 0
        # the fleet's, whichever replica set it
        metrics.engine_up.set_function(lambda: 1 if self.up else 0)
        for name in ENGINE_STATES:
            metrics.engine_state.labels(name).set_function(self._is_in(name))

    def _is_in(self, state: str) -> Callable[[], float]:
        return lambda: 1.0 if self.state == state else 0.0

    # the fleet as one engine (drift, rollouts, registration)

    @property
    def up(self) -> bool:
        return any(replica.routable for replica in self.replicas)

    def require_up(self) -> None:
        if not self.up:
            raise EngineUnavailable(
                "the pool does not answer; retry shortly"
                if self.pool
                else "the engine is starting or restarting; retry shortly"
                if len(self.replicas) <= 1
                else "no engine replica is up; retry shortly"
            )

    @property
    def state(self) -> str:
        """`up` while any replica serves; else the first replica's state."""
        if self.up:
            return "up"
        return self.replicas[0].supervisor.state if self.replicas else "unreachable"

    @property
    def generation(self) -> int:
        """Grows whenever any replica (re)starts (the drift monitor then asks the engine's
        identity again)."""
        return sum(replica.client.generation for replica in self.replicas)

    async def version(self) -> str:
        for replica in self.replicas:
            if replica.routable:
                return await replica.client.version()
        return "?"

    def home_replica(self, digest: str) -> str:
        """The adapter's first replica on the consistent-hash ring of every replica (up or not)."""
        names = tuple(sorted(replica.name for replica in self.replicas))
        if self._ring is None or self._ring.names != names:
            self._ring = HashRing(names)
        return self._ring.home(digest)

    def client_for(self, digest: str) -> EngineClient:
        """The replica that replays adapter `digest` (validation gate, A/B evaluation, drift
        replay)."""
        return self._choose(digest)[0].client

    def place(self, digest: str, exclude: Iterable[str] = ()) -> EngineReplica:
        """The replica a chat request for `digest` goes to (NoReplicaUp, 503, when none is up),
        counted."""
        replica, placement = self._choose(digest, exclude)
        replica.in_flight += 1
        replica.in_use[digest] += 1
        replica.placed += 1
        self.placed += 1
        self.metrics.placements.labels(replica.name, placement.reason).inc()
        if placement.spilled:
            self.spills += 1
            self.metrics.placement_spills.inc()
        return replica

    def _choose(self, digest: str, exclude: Iterable[str] = ()) -> tuple[EngineReplica, Placement]:
        if self.pool:  # (once more after a try that reached no pod: the pool chooses again)
            self.require_up()
            return self.replicas[0], Placement(self.replicas[0].name, False, "pool")
        excluded = set(exclude)
        candidates = [replica for replica in self.replicas if replica.name not in excluded]
        self.require_up()
        placement = self.policy.place(digest, [replica.snapshot(digest) for replica in candidates])
        return next(r for r in candidates if r.name == placement.replica), placement

    def release(self, replica: EngineReplica, digest: str) -> None:
        """A request for `digest` placed on `replica` has ended (answered, failed, or the client
        left)."""
        replica.in_flight = max(0, replica.in_flight - 1)
        replica.in_use[digest] -= 1
        if replica.in_use[digest] <= 0:
            del replica.in_use[digest]

    def mark_unreachable(self, replica: EngineReplica) -> None:
        """A request to `replica` got no answer: no more requests go there until a scrape
        answers. A pool stays: its gateway, not a pod, is what the request reached."""
        if self.pool:
            return
        if replica.reachable and replica.client.up:  # (a starting engine answers nothing yet)
            log.warning("replica %s did not answer; out of placement until it does", replica.name)
        replica.reachable = False
        self.metrics.replica_up.labels(replica.name).set(0)

    def fail_over(self, tried: Iterable[str]) -> bool:
        """Whether a request that got no answer from the replicas `tried` may go to another one
        (counted)."""
        excluded = set(tried)
        if not self.pool and not any(
            replica.routable for replica in self.replicas if replica.name not in excluded
        ):
            return False
        self.failovers += 1
        self.metrics.failovers.inc()
        return True

    async def preload(self, digests: Iterable[str]) -> None:
        """Register adapters a catalog change is about to use, each on the replica that will
        serve it (a failed load changes nothing); with every replica down they are registered on
        demand instead."""
        if self.up:
            for digest in digests:
                await self.client_for(digest).ensure_loaded(digest)

    async def unload(self, digest: str) -> None:
        for replica in self.replicas:
            await replica.client.unload(digest)

    async def register_home(self, replica: EngineReplica, digests: Iterable[str]) -> None:
        """After a replica (re)starts: register the adapters whose home it is (the others load on
        demand)."""
        for digest in sorted(digests):
            if len(self.replicas) == 1 or self.home_replica(digest) == replica.name:
                await replica.client.ensure_loaded(digest)

    # sizing

    def serves_rank(self, rank: int) -> bool:
        return all(replica.supervisor.serves_rank(rank) for replica in self.replicas)

    async def resize_for(self, workload: Workload) -> None:
        """Every supervised replica takes `workload`'s largest rank (each restarts with a larger
        one, or 409)."""
        for replica in self.replicas:
            await replica.supervisor.resize_for(workload)

    def slots(self) -> int:
        """Chat requests the fleet's batches hold at once (the fair queue's size)."""
        return max(1, sum(replica.slots for replica in self.replicas))

    def status(self) -> dict[str, Any]:
        """The fleet's state for /admin/engine: the first replica's supervision, and how many are
        up."""
        first = self.replicas[0].supervisor.status() if self.replicas else {}
        return {
            **first,
            "engine_state": self.state,
            "replicas": len(self.replicas),
            "replicas_up": sum(replica.routable for replica in self.replicas),
        }

    def describe(self) -> list[dict[str, Any]]:
        return [replica.describe() for replica in sorted(self.replicas, key=lambda r: r.name)]

    # running

    async def start(self) -> None:
        if self.settings.engines:
            await self._discover()
        for replica in self.replicas:
            await replica.supervisor.start()
        if not self.pool:  # a pool's endpoint picker reads its pods' metrics
            self._tasks.append(asyncio.create_task(self._scrape_forever(), name="fleet-scrape"))
        if self.settings.engines:
            self._tasks.append(
                asyncio.create_task(self._discover_forever(), name="fleet-discovery")
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for replica in self.replicas:
            await replica.supervisor.stop()

    async def _scrape_forever(self) -> None:
        while True:
            await asyncio.gather(*(self._scrape(replica) for replica in list(self.replicas)))
            try:
                await self.unload_strays()
            except Exception:  # the next scrape tries again; requests are served meanwhile
                log.exception("unloading stray adapter copies failed")
            await asyncio.sleep(self.settings.fleet_scrape_s)

    def strays(self, now: float | None = None) -> list[tuple[EngineReplica, str]]:
        """Copies of adapters on a replica that is not their home, idle for
        `stray_adapter_idle_s`, whose home replica is up and holds the adapter itself: requests go
        home, so the copy only takes a slot (it came while the home was down or full)."""
        if len(self.replicas) < 2:
            return []
        now = time.monotonic() if now is None else now
        by_name = {replica.name: replica for replica in self.replicas}
        found = []
        for replica in self.replicas:
            for digest in sorted(replica.client.loaded):
                home = by_name.get(self.home_replica(digest))
                idle_since = replica.client.residency.idle_since(digest)
                if (
                    home is not None
                    and home is not replica
                    and home.routable
                    and home.has(digest)
                    and not replica.in_use[digest]
                    and (
                        idle_since is None or now - idle_since >= self.settings.stray_adapter_idle_s
                    )
                ):
                    found.append((replica, digest))
        return found

    async def unload_strays(self) -> None:
        for replica, digest in self.strays():
            log.info(
                "replica %s: unloading adapter %s, idle here (its home is up)",
                replica.name,
                digest[:12],
            )
            await replica.client.unload(digest)
            self.metrics.adapter_stray_unloads.labels(replica.name).inc()

    async def _scrape(self, replica: EngineReplica) -> None:
        """One read of the replica's queue and adapters. A refused connection takes it out of
        placement; a slow answer (a busy engine) changes nothing."""
        http = replica.client.http
        ours = replica.in_flight  # when the engine's numbers are taken
        try:
            metrics = await http.get("/metrics", timeout=_SCRAPE_TIMEOUT_S)
            models = await http.get("/v1/models", timeout=_SCRAPE_TIMEOUT_S)
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            self.mark_unreachable(replica)
            return
        except httpx.HTTPError:
            return
        if metrics.status_code != 200 or models.status_code != 200:
            return
        try:
            replica.running, replica.waiting, node = parse_engine_metrics(metrics.text)
            replica.registered = frozenset(
                card["id"] for card in models.json().get("data", []) if card.get("parent")
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("replica %s: unreadable metrics (%s)", replica.name, exc)
            return
        replica.node = node or replica.node
        replica.size_caches()
        for tier, count in replica.client.residency.counts().items():
            self.metrics.adapter_resident.labels(replica.name, tier).set(count)
        replica.others = max(0, replica.running + replica.waiting - ours)
        if not replica.reachable and replica.scraped_at is not None:  # (not its first answer)
            log.info("replica %s answers again", replica.name)
        replica.scraped_at = time.time()
        replica.reachable = True
        self.metrics.replica_up.labels(replica.name).set(1 if replica.routable else 0)
        self.metrics.replica_requests.labels(replica.name, "running").set(replica.running)
        self.metrics.replica_requests.labels(replica.name, "waiting").set(replica.waiting)
        self.metrics.replica_adapters.labels(replica.name).set(
            len(replica.registered | replica.client.loaded)
        )

    async def _discover_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.fleet_discovery_s)
            try:
                await self._discover()
            except Exception:  # discovery must go on; the replicas known stay
                log.exception("resolving the engine nodes failed")

    async def _discover(self) -> None:
        """Every address of every `engines` URL is a replica: new ones join, vanished ones leave.
        A name that does not resolve now keeps the replicas it had (a DNS blip is not a fleet
        change)."""
        assert self._new_node is not None
        found: dict[str, tuple[str, str]] = {}  # name (address:port) -> its URL, the configured URL
        for source in self.settings.engines:
            parts = urlsplit(source)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    parts.hostname, port, type=socket.SOCK_STREAM
                )
            except socket.gaierror as exc:
                log.warning("engine %s does not resolve (%s); keeping its replicas", source, exc)
                found |= {
                    r.name: (r.client.url, source) for r in self.replicas if r.source == source
                }
                continue
            for *_, address in infos:
                ip = str(address[0])
                host = f"[{ip}]" if ":" in ip else ip
                found[f"{host}:{port}"] = (f"{parts.scheme}://{host}:{port}{parts.path}", source)
        known = {replica.name: replica for replica in self.replicas}
        for name in sorted(set(known) - set(found)):
            log.info("replica %s left the fleet", name)
            self.replicas.remove(known[name])
            await known[name].supervisor.stop()
            for gauge in (self.metrics.replica_up, self.metrics.replica_adapters):
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
            for tier in ("gpu", "cpu"):
                with contextlib.suppress(KeyError):
                    self.metrics.adapter_resident.remove(name, tier)
        for name in sorted(set(found) - set(known)):
            url, source = found[name]
            log.info("replica %s joins the fleet (%s)", name, source)
            replica = self._new_node(name, url)
            replica.source = source
            self.replicas.append(replica)
            if self._tasks:  # discovery after start: the new replica's supervision starts now
                await replica.supervisor.start()


def open_fleet(
    settings: Settings,
    store: AdapterStore,
    metrics: Metrics,
    hardware: Hardware,
    quantization: Quantization,
    sizing: EngineSizing,
    deployed: Callable[[], Awaitable[set[str]]],
) -> Fleet:
    """The replicas these settings name, each registering its share of `deployed()` adapters when
    it starts."""
    token = settings.engine_api_key.get_secret_value() if settings.engine_api_key else ""
    private = (settings.home, settings.base)
    logs = settings.home / "logs"
    fleet: Fleet

    def replica(
        name: str,
        kind: str,
        client: EngineClient,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> EngineReplica:
        async def on_ready() -> None:
            await fleet.register_home(this, await deployed())

        supervisor = EngineSupervisor(
            settings,
            client,
            metrics,
            log_path,
            hardware,
            quantization,
            sizing,
            on_ready=on_ready,
            attached=kind != "supervised",
            env=env,
        )
        this = EngineReplica(name, kind, client, supervisor)
        return this

    def node(name: str, url: str) -> EngineReplica:
        client = EngineClient(
            store, metrics, url=url, token=token, private_paths=private, by_digest=True
        )
        return replica(name, "node", client, logs / "engine.log")

    if settings.engines:
        fleet = Fleet(settings, metrics, [], new_node=node)
        return fleet
    if settings.pool_url:
        objectives = Objectives(
            settings.pool_objective, settings.pool_replay_objective or settings.pool_objective
        )
        client = EngineClient(
            store,
            metrics,
            url=settings.pool_url,
            token=token,
            private_paths=private,
            pool=objectives,
        )
        fleet = Fleet(settings, metrics, [replica("pool", "pool", client, logs / "engine.log")])
        return fleet
    if settings.engine_url:
        client = EngineClient(
            store, metrics, url=settings.engine_url, token=token, private_paths=private
        )
        fleet = Fleet(
            settings, metrics, [replica("engine-0", "attached", client, logs / "engine.log")]
        )
        return fleet
    members = []
    for i in range(settings.replicas):
        port = settings.engine_port + i if settings.engine_port else 0
        client = EngineClient(store, metrics, port, token=token, private_paths=private)
        log_path = logs / ("engine.log" if settings.replicas == 1 else f"engine-{i}.log")
        members.append(
            replica(f"engine-{i}", "supervised", client, log_path, _gpu_env(i, settings, hardware))
        )
    fleet = Fleet(settings, metrics, members)
    return fleet


def _gpu_env(index: int, settings: Settings, hardware: Hardware) -> dict[str, str] | None:
    """On a GPU box with several supervised replicas, replica i sees the i-th visible GPU only."""
    if settings.replicas == 1 or hardware.gpu is None:
        return None
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    device = visible[index % len(visible)] if visible else str(index)
    return {"CUDA_VISIBLE_DEVICES": device}
