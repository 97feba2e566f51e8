"""A fleet of vLLM replicas behind stateless gateways.

- `placement`  which replica serves a request for an adapter: routing policies over replica
               snapshots (random, least loaded, consistent hashing, consistent hashing with bounded
               loads), pure and clock-free
- `fleet`      the gateway's replicas (supervised engines or engine nodes found by DNS), what their
               own /metrics say, placement over them, and failover
"""

from __future__ import annotations

from lorafleet.errors import NoReplicaUp
from lorafleet.serve.fleet.placement import (
    POLICIES,
    AffinityPolicy,
    BoundedAffinityPolicy,
    HashRing,
    LeastLoadedPolicy,
    Placement,
    PlacementPolicy,
    RandomPolicy,
    Replica,
    load_bound,
    make_policy,
)

__all__ = [
    "POLICIES",
    "AffinityPolicy",
    "BoundedAffinityPolicy",
    "HashRing",
    "LeastLoadedPolicy",
    "NoReplicaUp",
    "Placement",
    "PlacementPolicy",
    "RandomPolicy",
    "Replica",
    "load_bound",
    "make_policy",
]
