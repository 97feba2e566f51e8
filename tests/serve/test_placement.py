"""The fleet's placement policies: pure functions of replica snapshots."""

from __future__ import annotations

import hashlib

import pytest

from lorafleet.errors import NoReplicaUp
from lorafleet.serve.fleet.placement import (
    AffinityPolicy,
    BoundedAffinityPolicy,
    HashRing,
    LeastLoadedPolicy,
    RandomPolicy,
    Replica,
    load_bound,
    make_policy,
)

DIGESTS = [hashlib.sha256(f"adapter-{i}".encode()).hexdigest() for i in range(2000)]


def _fleet(n: int, **loads: int) -> list[Replica]:
    return [
        Replica(f"r{i}", running=loads.get(f"r{i}", 0), waiting=0, loaded=frozenset())
        for i in range(n)
    ]


def _with(replicas: list[Replica], name: str, **changes: object) -> list[Replica]:
    out = []
    for r in replicas:
        if r.name == name:
            fields = {
                "running": r.running,
                "waiting": r.waiting,
                "loaded": r.loaded,
                "up": r.up,
                **changes,
            }
            r = Replica(r.name, **fields)  # type: ignore[arg-type]
        out.append(r)
    return out


def test_adding_a_replica_moves_about_one_in_n_digests():
    names = [f"r{i}" for i in range(10)]
    before, after = HashRing(names), HashRing([*names, "r10"])
    moved = [d for d in DIGESTS if before.home(d) != after.home(d)]
    assert all(after.home(d) == "r10" for d in moved)  # only to the newcomer
    assert 0.5 / 11 < len(moved) / len(DIGESTS) < 1.6 / 11


def test_the_ring_is_stable_across_instances_and_orders():
    names = [f"r{i}" for i in range(8)]
    assert [HashRing(names).home(d) for d in DIGESTS[:200]] == [
        HashRing(list(reversed(names))).home(d) for d in DIGESTS[:200]
    ]
    assert sorted(HashRing(names).walk(DIGESTS[0])) == names


def test_the_load_bound_is_the_papers():
    assert load_bound(total_load=99, n_up=4, load_factor=1.25) == 32  # ceil(1.25 * 100 / 4)
    assert load_bound(0, 8) == 1


def test_bounded_affinity_takes_the_home_under_the_bound():
    fleet = _fleet(4)
    home = HashRing([r.name for r in fleet]).home(DIGESTS[0])
    placement = BoundedAffinityPolicy().place(DIGESTS[0], fleet)
    assert placement.replica == home and not placement.spilled and placement.reason == "Home"


def test_bounded_affinity_spills_past_a_home_over_the_bound():
    digest = DIGESTS[1]
    ring = HashRing([f"r{i}" for i in range(4)])
    home, second = list(ring.walk(digest))[:2]
    fleet = _with(_fleet(4), home, running=10)  # bound = ceil(1.25 * 11 / 4) = 4
    placement = BoundedAffinityPolicy().place(digest, fleet)
    assert placement.replica == second and placement.spilled and placement.reason == "HomeOverBound"


def test_the_bound_is_respected_under_any_sequence_of_placements():
    policy, fleet = BoundedAffinityPolicy(load_factor=1.25), _fleet(6)
    for digest in DIGESTS[:600:3] * 3:  # a few hot digests, many times
        bound = load_bound(sum(r.load for r in fleet), len(fleet), 1.25)
        chosen = policy.place(digest, fleet).replica
        target = next(r for r in fleet if r.name == chosen)
        assert target.load < bound
        fleet = _with(fleet, chosen, running=target.running + 1)
    assert max(r.load for r in fleet) <= load_bound(sum(r.load for r in fleet) - 1, 6, 1.25)


def test_a_down_replica_is_skipped():
    digest = DIGESTS[2]
    home, second = list(HashRing([f"r{i}" for i in range(4)]).walk(digest))[:2]
    fleet = _with(_fleet(4), home, up=False, loaded=frozenset({digest}))
    for policy in (AffinityPolicy(), BoundedAffinityPolicy()):
        assert policy.place(digest, fleet).replica == second
    assert AffinityPolicy().place(digest, fleet).reason == "HomeDown"
    assert all(RandomPolicy(seed).place(digest, fleet).replica != home for seed in range(30))
    assert LeastLoadedPolicy().place(digest, fleet).replica != home


def test_nothing_up_is_an_error():
    fleet = [Replica("r0", 0, 0, frozenset(), up=False)]
    for name in ("random", "least_loaded", "affinity", "bounded_affinity"):
        with pytest.raises(NoReplicaUp):
            make_policy(name).place(DIGESTS[0], fleet)


def test_a_near_candidate_with_the_adapter_loaded_is_preferred():
    digest = DIGESTS[3]
    walk = list(HashRing([f"r{i}" for i in range(4)]).walk(digest))
    fleet = _with(_fleet(4), walk[1], loaded=frozenset({digest}))
    for policy in (AffinityPolicy(), BoundedAffinityPolicy()):
        placement = policy.place(digest, fleet)
        assert (
            placement.replica == walk[1]
            and placement.reason == "AdapterLoaded"
            and not placement.spilled
        )
    far = _with(_fleet(4), walk[3], loaded=frozenset({digest}))  # beyond the loaded window of 2
    assert BoundedAffinityPolicy().place(digest, far).replica == walk[0]
    over = _with(fleet, walk[1], running=10)  # loaded but over the bound: not taken
    assert BoundedAffinityPolicy().place(digest, over).replica == walk[0]


def test_least_loaded_breaks_ties_towards_the_loaded_adapter():
    digest = DIGESTS[4]
    fleet = _with(_fleet(3, r0=2), "r2", loaded=frozenset({digest}))
    assert LeastLoadedPolicy().place(digest, fleet).replica == "r2"


def test_placements_are_deterministic():
    fleet = _fleet(16, r3=5, r7=9)
    for name in ("random", "least_loaded", "affinity", "bounded_affinity"):
        first = [make_policy(name, seed=1).place(d, fleet) for d in DIGESTS[:100]]
        again = [make_policy(name, seed=1).place(d, fleet) for d in DIGESTS[:100]]
        assert first == again


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        BoundedAffinityPolicy(load_factor=0.9)
    with pytest.raises(ValueError):
        make_policy("round_robin")
    with pytest.raises(ValueError):
        HashRing(["r0"], vnodes=0)
