"""Which replica serves a request for adapter `digest`: pure routing policies over replica
snapshots.

A gateway (or `loadtests/sim_fleet.py`) takes a snapshot of every replica (`Replica`: requests
running and waiting, adapters resident in its GPU slots, up or not) and asks a policy for a
`Placement`. Policies do no I/O and read no clock; the only state they keep is a hash ring, rebuilt
when the set of replica names changes.

- `RandomPolicy`          any up replica, uniformly (seeded)
- `LeastLoadedPolicy`     the up replica with the fewest running + waiting requests
- `AffinityPolicy`        consistent hashing of the digest on a ring with virtual nodes (no load
                          bound)
- `BoundedAffinityPolicy` consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam
  2018, "Consistent Hashing with Bounded Loads", as in HAProxy's `hash-balance-factor` and Vimeo's
  use): walk the ring from the digest's point, take the first up replica whose load is under
  `ceil(load_factor * (total load + 1) / n_up)`

Errors: `lorafleet.errors.NoReplicaUp` (a ServiceUnavailable, 503) when no replica is up.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from lorafleet.errors import NoReplicaUp

__all__ = [
    "POLICIES",
    "AffinityPolicy",
    "BoundedAffinityPolicy",
    "HashRing",
    "LeastLoadedPolicy",
    "Placement",
    "PlacementPolicy",
    "RandomPolicy",
    "Replica",
    "load_bound",
    "make_policy",
]

# Placement reasons (CamelCase, as conditions elsewhere in lorafleet).
HOME = "Home"  # the digest's first up replica on the ring
LOADED = "AdapterLoaded"  # a ring candidate that already has the adapter in a GPU slot
OVER_BOUND = "HomeOverBound"  # the home replica was at its load bound: the walk went on
HOME_DOWN = "HomeDown"  # only for policies without a bound: the first ring replica was down
RANDOM = "Random"
LEAST_LOADED = "LeastLoaded"

DEFAULT_VNODES = 100
DEFAULT_LOAD_FACTOR = 1.25  # c in the paper; HAProxy's hash-balance-factor 125
DEFAULT_LOADED_WINDOW = 2  # how many up ring candidates the loaded preference looks at


@dataclass(frozen=True)
class Replica:
    """One replica as a gateway sees it now."""

    name: str
    running: int
    waiting: int
    loaded: frozenset[str]
    up: bool = True

    @property
    def load(self) -> int:
        """Requests on this replica: running + waiting."""
        return self.running + self.waiting


@dataclass(frozen=True)
class Placement:
    """The replica chosen, whether the request spilled past its home because of load, and why."""

    replica: str
    spilled: bool
    reason: str


def _point(key: str) -> int:
    """A stable 64-bit ring position (blake2b; Python's hash() differs per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class HashRing:
    """A consistent-hash ring of replica names, each at `vnodes` points; build once per
    replica-set change."""

    def __init__(self, names: Sequence[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes}")
        self.names = tuple(sorted(set(names)))
        ring = sorted((_point(f"{name}#{i}"), name) for name in self.names for i in range(vnodes))
        self._points = [point for point, _ in ring]
        self._owners = [name for _, name in ring]

    def walk(self, digest: str) -> Iterator[str]:
        """Every replica name once, in ring order from the digest's point (clockwise)."""
        if not self._points:
            return
        start = bisect.bisect_right(self._points, _point(digest))
        seen: set[str] = set()
        n = len(self._points)
        for i in range(n):
            name = self._owners[(start + i) % n]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self.names):
                    return

    def home(self, digest: str) -> str:
        """The digest's first replica on the ring."""
        return next(self.walk(digest))


def load_bound(total_load: int, n_up: int, load_factor: float = DEFAULT_LOAD_FACTOR) -> int:
    """The paper's capacity: a replica may take a request while its load is below this."""
    return math.ceil(load_factor * (total_load + 1) / n_up)


class PlacementPolicy(Protocol):
    """Chooses a replica for one request."""

    name: str

    def place(self, digest: str, replicas: Sequence[Replica]) -> Placement:
        """The replica to send a request for `digest` to."""
        ...


def _up(digest: str, replicas: Sequence[Replica]) -> list[Replica]:
    up = [replica for replica in replicas if replica.up]
    if not up:
        raise NoReplicaUp(digest)
    return up


class RandomPolicy:
    """Any up replica, uniformly at random (seeded: deterministic for a seed)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def place(self, digest: str, replicas: Sequence[Replica]) -> Placement:
        """A uniform choice among the up replicas."""
        return Placement(self._rng.choice(_up(digest, replicas)).name, spilled=False, reason=RANDOM)


class LeastLoadedPolicy:
    """The up replica with the lowest running + waiting; ties go to one with the adapter loaded,
    then by name."""

    name = "least_loaded"

    def place(self, digest: str, replicas: Sequence[Replica]) -> Placement:
        """The least-loaded up replica."""
        best = min(_up(digest, replicas), key=lambda r: (r.load, digest not in r.loaded, r.name))
        return Placement(best.name, spilled=False, reason=LEAST_LOADED)


class _RingPolicy:
    """Shared by the hashing policies: a ring cached per replica-name set."""

    def __init__(
        self, vnodes: int = DEFAULT_VNODES, loaded_window: int = DEFAULT_LOADED_WINDOW
    ) -> None:
        if loaded_window < 1:
            raise ValueError(f"loaded_window must be at least 1, got {loaded_window}")
        self.vnodes = vnodes
        self.loaded_window = loaded_window
        self._ring: HashRing | None = None

    def ring(self, replicas: Sequence[Replica]) -> HashRing:
        """The ring of these replicas' names, rebuilt only when the name set changes."""
        names = tuple(sorted({replica.name for replica in replicas}))
        if self._ring is None or self._ring.names != names:
            self._ring = HashRing(names, self.vnodes)
        return self._ring

    def _candidates(self, digest: str, replicas: Sequence[Replica]) -> list[Replica]:
        """The up replicas in ring order from the digest's point (down ones skipped at once)."""
        _up(digest, replicas)
        by_name = {replica.name: replica for replica in replicas}
        return [by_name[name] for name in self.ring(replicas).walk(digest) if by_name[name].up]


class AffinityPolicy(_RingPolicy):
    """Pure consistent hashing: the digest's first up replica on the ring, whatever its load.

    Loaded preference: among the first `loaded_window` up replicas on the walk, the first that has
    the adapter loaded wins; else the first up replica (the home).
    """

    name = "affinity"

    def place(self, digest: str, replicas: Sequence[Replica]) -> Placement:
        """The home replica, or a near ring candidate that already has the adapter."""
        candidates = self._candidates(digest, replicas)
        for replica in candidates[: self.loaded_window]:
            if digest in replica.loaded:
                return Placement(replica.name, spilled=False, reason=LOADED)
        first_on_ring = self.ring(replicas).home(digest)
        reason = HOME if candidates[0].name == first_on_ring else HOME_DOWN
        return Placement(candidates[0].name, spilled=False, reason=reason)


class BoundedAffinityPolicy(_RingPolicy):
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

    bound = ceil(load_factor * (total load of the up replicas + 1) / number of up replicas); a
    replica is "under the bound" while its running + waiting is below it. Down replicas are skipped
    at once and count in neither the total nor the number. The walk goes clockwise from the digest's
    point:

    1. Among the first `loaded_window` up replicas on the walk (default 2), the first one that is
       under the bound AND has the adapter loaded wins (reason `AdapterLoaded`).
    2. Otherwise the first up replica on the whole walk that is under the bound wins (`Home` if it
       is the first up replica, `HomeOverBound` if the walk passed replicas at the bound).

    `spilled` is true exactly when the first up replica on the walk (the home) was at or over the
    bound. Some replica is always under it: the bound exceeds the mean load, so the least-loaded
    replica is below it.
    """

    name = "bounded_affinity"

    def __init__(
        self,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        vnodes: int = DEFAULT_VNODES,
        loaded_window: int = DEFAULT_LOADED_WINDOW,
    ) -> None:
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be at least 1.0, got {load_factor}")
        super().__init__(vnodes, loaded_window)
        self.load_factor = load_factor

    def place(self, digest: str, replicas: Sequence[Replica]) -> Placement:
        """The first ring candidate under the load bound, a loaded one among the first few
        preferred."""
        candidates = self._candidates(digest, replicas)
        bound = load_bound(sum(r.load for r in candidates), len(candidates), self.load_factor)
        spilled = candidates[0].load >= bound
        for replica in candidates[: self.loaded_window]:
            if replica.load < bound and digest in replica.loaded:
                return Placement(replica.name, spilled=spilled, reason=LOADED)
        for replica in candidates:
            if replica.load < bound:
                return Placement(
                    replica.name, spilled=spilled, reason=OVER_BOUND if spilled else HOME
                )
        raise AssertionError("unreachable: the least-loaded replica is always under the bound")


POLICIES = ("random", "least_loaded", "affinity", "bounded_affinity")


def make_policy(
    name: str,
    *,
    seed: int = 0,
    load_factor: float = DEFAULT_LOAD_FACTOR,
    vnodes: int = DEFAULT_VNODES,
) -> PlacementPolicy:
    """A policy by its name (one of `POLICIES`)."""
    match name:
        case "random":
            return RandomPolicy(seed)
        case "least_loaded":
            return LeastLoadedPolicy()
        case "affinity":
            return AffinityPolicy(vnodes)
        case "bounded_affinity":
            return BoundedAffinityPolicy(load_factor, vnodes)
    raise ValueError(f"unknown placement policy {name!r}; one of {', '.join(POLICIES)}")
