"""Routing a fleet of vLLM replicas, by discrete-event simulation: random, least_loaded, affinity
and bounded_affinity (the policies of `lorafleet.serve.fleet.placement`, the code a gateway runs) at
sizes this box cannot hold. Simulated, calibrated numbers, not measurements of a fleet.

Workload: 1,000 tenants of 10 adapters each (10,000 adapters, sha256-named), adapter popularity
Zipf(1.1). Arrivals are Markov-modulated Poisson: the fleet alternates bursts (mean 0.5 s, 1.5x the
mean rate) and lulls (mean 1 s, 0.75x); during each burst 30 % of the requests come from one tenant
drawn uniformly (its 10 adapters uniform), so cold tenants burst too. The mean offered load is
`--load` (0.75) of the fleet's estimated capacity: per replica, `max_num_seqs / (tokens *
step(max_num_seqs, distinct=min(max_loras, max_num_seqs)))`.

Each replica: `max_loras` GPU slots (LRU; an adapter with running requests is pinned), a FIFO
waiting queue and continuous batching in steps. At each step start the scheduler scans the first `2
* max_num_seqs` waiting requests in order and admits each while the batch has room and its adapter
is resident, or can be made resident (a free slot, or evicting the least recently used unpinned
adapter: `load_s` added to that step); others wait (vLLM's scheduler also skips a request whose LoRA
does not fit). A step serves every running sequence one token: `step_s = (base_s + per_seq_s *
batch) * (1 + per_adapter * distinct_adapters_in_batch) + loads * load_s`. A request needs `tokens`
output tokens. The gateway routes each arrival with the policy, given every replica's current
running / waiting / resident adapters. Statistics skip the first quarter of the run (warm-up).

Calibration, `--profile cpu-measured` (docs/benchmarks.md, tiny Qwen2.5-VL on this 2-core CPU box):
- base_s 3.9 ms, per_seq_s 0.40 ms: "Gateway vs vLLM alone", vLLM alone, 16 output tokens: 1 client
  p50 72 ms (4.5 ms a step) and 64 clients p50 472 ms (29.5 ms a step); a line through both (16
  clients' 199 ms predicts 10.3 ms a step, measured 12.4). "Fair share": a step of 64 costs about
  five times one of a single sequence.
- per_adapter 0.005 (per distinct adapter in a batch, relative): "Many adapters": 64 adapters ÷ 1 at
  16 clients 0.933 (about 14 distinct in a batch of 16: k = 0.0056) and the CI guard's 16 adapters ÷
  1 0.968 (about 10 distinct: k = 0.0036); their mean.
- load_s 12 ms: "Many adapters", cold adapter: deploy, engine load included, 12 ms (vLLM's
  `/v1/load_lora_adapter` alone takes about 10 ms).
- tokens 16, max_num_seqs 64: those benchmarks' 16 output tokens; the derived CPU sizing
  (`max_num_seqs` 64).
`--profile gpu-assumed` (ASSUMPTIONS, not measured: no GPU here): a 7B 4-bit base on one data-centre
GPU, base_s 25 ms, per_seq_s 0.08 ms (decode bound by memory bandwidth), per_adapter 0.03
(multi-LoRA kernels), load_s 30 ms (host-to-GPU copy of a rank-16 adapter), tokens 64, max_num_seqs
256.

    .venv/bin/python loadtests/sim_fleet.py [--replicas 8,64,256] [--max-loras 8,16,32]
        [--duration-s 60] [--seed 0] [--profile cpu-measured|gpu-assumed] [--load 0.75]
        [--policies ...] [--quick] [--markdown]

`--duration-s` is simulated seconds for 8 replicas; a fleet of n runs `duration * 8 / n`, at least
`--min-duration-s` (5 s) and four request lifetimes at a full batch, so every run handles a similar
number of requests and sees requests finish.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np
from rich.console import Console
from rich.table import Table

from lorafleet.serve.fleet.placement import POLICIES, PlacementPolicy, Replica, make_policy

console = Console(width=160)

TENANTS = 1_000
ADAPTERS_PER_TENANT = 10
ZIPF_EXPONENT = 1.1
BURST_MEAN_S, LULL_MEAN_S = 0.5, 1.0
BURST_RATE, LULL_RATE = 1.5, 0.75  # x the mean rate: (1.5 * 0.5 + 0.75 * 1.0) / 1.5 = 1
BURST_TENANT_SHARE = 0.3
WARMUP_SHARE = 0.25


@dataclass(frozen=True)
class Profile:
    """Engine costs of one replica."""

    base_s: float
    per_seq_s: float
    per_adapter: float
    load_s: float
    tokens: int
    max_num_seqs: int

    def step_s(self, batch: int, distinct: int) -> float:
        """One continuous-batching step, adapter loads excluded."""
        return (self.base_s + self.per_seq_s * batch) * (1 + self.per_adapter * distinct)

    def capacity_rps(self, max_loras: int) -> float:
        """Estimated requests per second of one replica at a full batch."""
        full = self.max_num_seqs
        return full / (self.tokens * self.step_s(full, min(max_loras, full)))


PROFILES = {
    "cpu-measured": Profile(
        base_s=0.0039,
        per_seq_s=0.00040,
        per_adapter=0.005,
        load_s=0.012,
        tokens=16,
        max_num_seqs=64,
    ),
    "gpu-assumed": Profile(
        base_s=0.025, per_seq_s=0.00008, per_adapter=0.03, load_s=0.030, tokens=64, max_num_seqs=256
    ),
}


@dataclass(frozen=True)
class Workload:
    """Arrival times and adapter indices of every request, plus the adapters' digests."""

    arrivals: list[float]
    adapters: list[int]
    digests: list[str]


def make_workload(rate: float, duration_s: float, rng: np.random.Generator) -> Workload:
    """Bursty (Markov-modulated Poisson) arrivals over Zipf-popular adapters, with per-tenant
    bursts."""
    n_adapters = TENANTS * ADAPTERS_PER_TENANT
    weights = 1.0 / np.arange(1, n_adapters + 1) ** ZIPF_EXPONENT
    # rank -> adapter, so a tenant's adapters are not all popular
    popularity = rng.permutation(n_adapters)
    times, adapters = [], []
    t, burst = 0.0, bool(rng.random() < 1 / 3)
    while t < duration_s:
        dwell = min(rng.exponential(BURST_MEAN_S if burst else LULL_MEAN_S), duration_s - t)
        count = rng.poisson(rate * (BURST_RATE if burst else LULL_RATE) * dwell)
        times.append(t + np.sort(rng.random(count)) * dwell)
        chosen = popularity[rng.choice(n_adapters, size=count, p=weights / weights.sum())]
        if burst:
            tenant = rng.integers(TENANTS)
            own = rng.random(count) < BURST_TENANT_SHARE
            chosen[own] = tenant * ADAPTERS_PER_TENANT + rng.integers(
                ADAPTERS_PER_TENANT, size=int(own.sum())
            )
        adapters.append(chosen)
        t, burst = t + dwell, not burst
    digests = [hashlib.sha256(f"adapter-{i}".encode()).hexdigest() for i in range(n_adapters)]
    return Workload(np.concatenate(times).tolist(), np.concatenate(adapters).tolist(), digests)


@dataclass
class _Replica:
    """One simulated engine."""

    name: str
    max_loras: int
    slots: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    pinned: dict[str, int] = field(default_factory=dict)  # adapter -> running requests
    waiting: deque[int] = field(default_factory=deque)
    # step number -> requests done at its end
    finishing: dict[int, list[int]] = field(default_factory=dict)
    running: int = 0
    step_no: int = 0
    busy: bool = False

    def snapshot(self) -> Replica:
        """What the gateway sees."""
        return Replica(self.name, self.running, len(self.waiting), frozenset(self.slots), up=True)


@dataclass
class Counters:
    """What a run counts (admissions and loads only after the warm-up)."""

    admitted: int = 0
    hits: int = 0
    loads: int = 0
    placed: int = 0
    spilled: int = 0
    completed: int = 0


@dataclass(frozen=True)
class Result:
    """One run's figures."""

    policy: str
    replicas: int
    max_loras: int
    offered_rps: float  # the mean rate asked for
    arrived_rps: float  # what arrived in the measured window (bursts make it differ on short runs)
    rps: float
    p50_s: float
    p99_s: float
    loads_per_s: float
    hit_rate: float
    spill_rate: float
    arrived: int
    completed: int
    in_flight: int


class FleetSim:
    """The event loop: arrivals from the workload, one step-end event per busy replica in a heap."""

    def __init__(
        self,
        policy: PlacementPolicy,
        n_replicas: int,
        max_loras: int,
        profile: Profile,
        workload: Workload,
        duration_s: float,
    ) -> None:
        self.policy, self.profile, self.workload, self.duration_s = (
            policy,
            profile,
            workload,
            duration_s,
        )
        self.replicas = [_Replica(f"r{i:03d}", max_loras) for i in range(n_replicas)]
        self.snapshots = [r.snapshot() for r in self.replicas]
        self.index = {r.name: i for i, r in enumerate(self.replicas)}
        self.done_at = [float("nan")] * len(workload.arrivals)
        self.events: list[tuple[float, int]] = []
        self.counters = Counters()
        self.warmup_s = duration_s * WARMUP_SHARE
        self.now = 0.0

    def run(self) -> FleetSim:
        """Every event up to the duration; what is still queued or running then stays in flight."""
        arrivals, n = self.workload.arrivals, len(self.workload.arrivals)
        next_arrival = 0
        while True:
            t_arrival = arrivals[next_arrival] if next_arrival < n else float("inf")
            t_step = self.events[0][0] if self.events else float("inf")
            if min(t_arrival, t_step) > self.duration_s:
                return self
            if t_arrival <= t_step:
                self.now = t_arrival
                self._arrive(next_arrival)
                next_arrival += 1
            else:
                self.now, i = heapq.heappop(self.events)
                self._end_step(i)

    def _arrive(self, request: int) -> None:
        digest = self.workload.digests[self.workload.adapters[request]]
        placement = self.policy.place(digest, self.snapshots)
        if self.now >= self.warmup_s:
            self.counters.placed += 1
            self.counters.spilled += placement.spilled
        i = self.index[placement.replica]
        replica = self.replicas[i]
        replica.waiting.append(request)
        if replica.busy:
            self.snapshots[i] = replica.snapshot()
        else:
            self._start_step(i)

    def _end_step(self, i: int) -> None:
        replica = self.replicas[i]
        replica.step_no += 1
        for request in replica.finishing.pop(replica.step_no, ()):
            self.done_at[request] = self.now
            self.counters.completed += 1
            replica.running -= 1
            digest = self.workload.digests[self.workload.adapters[request]]
            replica.pinned[digest] -= 1
            if not replica.pinned[digest]:
                del replica.pinned[digest]
        replica.busy = False
        self._start_step(i)

    def _start_step(self, i: int) -> None:
        replica = self.replicas[i]
        loads = self._admit(replica)
        if replica.running:
            dt = (
                self.profile.step_s(replica.running, len(replica.pinned))
                + loads * self.profile.load_s
            )
            heapq.heappush(self.events, (self.now + dt, i))
            replica.busy = True
        self.snapshots[i] = replica.snapshot()

    def _admit(self, replica: _Replica) -> int:
        """Admit waiting requests into the batch in order; returns the adapter loads this step
        pays for."""
        room = self.profile.max_num_seqs - replica.running
        scan = min(len(replica.waiting), 2 * self.profile.max_num_seqs)
        skipped: list[int] = []
        loads = 0
        counting = self.now >= self.warmup_s
        for _ in range(scan):
            if room == 0:
                break
            request = replica.waiting.popleft()
            digest = self.workload.digests[self.workload.adapters[request]]
            hit = digest in replica.slots
            if hit:
                replica.slots.move_to_end(digest)
            elif not self._make_resident(replica, digest):
                skipped.append(request)
                continue
            else:
                loads += 1
            replica.pinned[digest] = replica.pinned.get(digest, 0) + 1
            replica.running += 1
            room -= 1
            replica.finishing.setdefault(replica.step_no + self.profile.tokens, []).append(request)
            if counting:
                self.counters.admitted += 1
                self.counters.hits += hit
                self.counters.loads += not hit
        replica.waiting.extendleft(reversed(skipped))
        return loads

    @staticmethod
    def _make_resident(replica: _Replica, digest: str) -> bool:
        """Load `digest` into a free slot or in place of the LRU unpinned adapter; False when all
        are pinned."""
        if len(replica.slots) >= replica.max_loras:
            victim = next((name for name in replica.slots if name not in replica.pinned), None)
            if victim is None:
                return False
            del replica.slots[victim]
        replica.slots[digest] = None
        return True

    def result(self, offered_rps: float) -> Result:
        """The run's figures over the measured window (after the warm-up)."""
        arrivals = np.asarray(self.workload.arrivals)
        done = np.asarray(self.done_at)
        arrived = int((arrivals <= self.duration_s).sum())
        measured = (arrivals >= self.warmup_s) & (arrivals <= self.duration_s)
        latency = done[measured] - arrivals[measured]
        latency = latency[~np.isnan(latency)]
        window = self.duration_s - self.warmup_s
        completed_in_window = int(((done >= self.warmup_s) & (done <= self.duration_s)).sum())
        in_flight = sum(r.running + len(r.waiting) for r in self.replicas)
        c = self.counters
        return Result(
            policy=self.policy.name,
            replicas=len(self.replicas),
            max_loras=self.replicas[0].max_loras,
            offered_rps=offered_rps,
            arrived_rps=int(measured.sum()) / window,
            rps=completed_in_window / window,
            p50_s=float(np.percentile(latency, 50)) if latency.size else float("nan"),
            p99_s=float(np.percentile(latency, 99)) if latency.size else float("nan"),
            loads_per_s=c.loads / window,
            hit_rate=c.hits / c.admitted if c.admitted else float("nan"),
            spill_rate=c.spilled / c.placed if c.placed else 0.0,
            arrived=arrived,
            completed=c.completed,
            in_flight=in_flight,
        )


def simulate(
    policy: str,
    n_replicas: int,
    max_loras: int,
    profile: Profile,
    duration_s: float,
    seed: int,
    load: float = 0.75,
    rate: float | None = None,
) -> Result:
    """One run: the same seeded workload for every policy at a given fleet size."""
    offered = rate if rate is not None else load * n_replicas * profile.capacity_rps(max_loras)
    workload = make_workload(offered, duration_s, np.random.default_rng(seed))
    sim = FleetSim(
        make_policy(policy, seed=seed), n_replicas, max_loras, profile, workload, duration_s
    )
    return sim.run().result(offered)


HEADER = (
    "replicas",
    "max_loras",
    "policy",
    "arrived req/s",
    "served req/s",
    "p50",
    "p99",
    "loads/s",
    "slot hit rate",
    "spill rate",
    "in flight at end",
)


def _table(results: list[Result], title: str) -> Table:
    table = Table(title=title)
    for column in HEADER:
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(*_cells(r))
    return table


def _cells(r: Result) -> list[str]:
    return [
        str(r.replicas),
        str(r.max_loras),
        r.policy,
        f"{r.arrived_rps:,.0f}",
        f"{r.rps:,.0f}",
        f"{r.p50_s * 1000:,.0f} ms",
        f"{r.p99_s * 1000:,.0f} ms",
        f"{r.loads_per_s:,.0f}",
        f"{r.hit_rate:.1%}",
        f"{r.spill_rate:.1%}",
        f"{r.in_flight:,}",
    ]


def _markdown(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="8,64,256")
    parser.add_argument("--max-loras", default="8,16,32")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument(
        "--duration-s", type=float, default=60.0, help="simulated seconds at 8 replicas"
    )
    parser.add_argument("--min-duration-s", type=float, default=5.0)
    parser.add_argument(
        "--load", type=float, default=0.75, help="offered load ÷ the fleet's estimated capacity"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-measured")
    parser.add_argument(
        "--quick", action="store_true", help="8 and 64 replicas, max_loras 8 and 32, short runs"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args()
    if args.quick:
        args.replicas, args.max_loras, args.duration_s, args.min_duration_s = (
            "8,64",
            "8,32",
            10.0,
            1.5,
        )
    profile = PROFILES[args.profile]
    results = []
    t0 = time.perf_counter()
    for n in (int(x) for x in args.replicas.split(",")):
        # one request at a full batch
        lifetime_s = profile.tokens * profile.step_s(profile.max_num_seqs, 1)
        duration = max(args.duration_s * 8 / n, args.min_duration_s, 4 * lifetime_s)
        for max_loras in (int(x) for x in args.max_loras.split(",")):
            for policy in args.policies.split(","):
                results.append(
                    simulate(policy, n, max_loras, profile, duration, args.seed, args.load)
                )
                r = results[-1]
                console.log(
                    f"{n} replicas, max_loras {max_loras}, {policy}: {r.arrived:,} requests "
                    f"in {duration:.1f} simulated s ({time.perf_counter() - t0:.0f} s so far)"
                )
    console.print(
        _table(
            results,
            f"simulated fleet, profile {args.profile}, offered {args.load:.0%} of the "
            f"estimated capacity, seed {args.seed} (simulated, calibrated; not measured)",
        )
    )
    if args.markdown:
        print(_markdown(results))


if __name__ == "__main__":
    main()
