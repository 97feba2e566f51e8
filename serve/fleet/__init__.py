"""A fleet of vLLM replicas behind stateless gateways.

- `placement`  which replica serves a request for an adapter: routing policies over replica snapshots
  (random, least loaded, consistent hashing, consistent hashing with bounded loads), pure and clock-free
"""

from __future__ import annotations

from lorafleet.serve.fleet.placement import (
    POLICIES,
    AffinityPolicy,
    BoundedAffinityPolicy,
    HashRing,
    LeastLoadedPolicy,
    NoReplicaUp,
    Placement,
    PlacementPolicy,
    RandomPolicy,
    Replica,
    load_bound,
    make_policy,
)

__all__ = ["POLICIES", "AffinityPolicy", "BoundedAffinityPolicy", "HashRing", "LeastLoadedPolicy", "NoReplicaUp",
           "Placement", "PlacementPolicy", "RandomPolicy", "Replica", "load_bound", "make_policy"]
