"""The gateway's model of a replica's adapter caches: vLLM's two LRUs, the CPU cache and the GPU
slots within it."""

from __future__ import annotations

import pytest

from lorafleet.serve.engine.residency import Residency


def test_a_new_adapter_is_cold_then_resident_in_both_tiers():
    caches = Residency(cpu_capacity=3, gpu_capacity=2)
    assert caches.tier("a") is None and not caches.resident("a")
    first = caches.touch("a", now=1.0)
    assert first.cold and first.evicted_cpu == first.evicted_gpu == ()
    assert caches.tier("a") == "gpu" and caches.idle_since("a") == 1.0
    assert not caches.touch("a", now=2.0).cold and caches.idle_since("a") == 2.0


def test_the_least_recently_used_leaves_the_slots_first_then_memory():
    caches = Residency(cpu_capacity=3, gpu_capacity=2)
    for digest in "abc":
        caches.touch(digest)
    # three in memory, the two most recent in the slots
    assert [caches.tier(d) for d in "abc"] == ["cpu", "gpu", "gpu"]
    assert caches.counts() == {"gpu": 2, "cpu": 3}
    caches.touch("a")  # back in a slot: b is now the slots' least recent
    assert [caches.tier(d) for d in "abc"] == ["gpu", "cpu", "gpu"]
    pushed = caches.touch("d")  # memory is full: b, least recently used, leaves it
    assert pushed.cold and pushed.evicted_cpu == ("b",) and pushed.evicted_gpu == ("c",)
    assert caches.tier("b") is None and caches.digests() == ["c", "a", "d"]
    assert caches.touch("b").cold  # read from disk again


def test_forgetting_and_clearing():
    caches = Residency(cpu_capacity=4, gpu_capacity=4)
    caches.touch("a")
    caches.touch("b")
    caches.forget("a")
    assert caches.tier("a") is None and caches.counts() == {"gpu": 1, "cpu": 1}
    caches.clear()
    assert caches.counts() == {"gpu": 0, "cpu": 0}


def test_slots_never_outnumber_memory():
    caches = Residency(cpu_capacity=2, gpu_capacity=8)
    for digest in "abc":
        caches.touch(digest)
    assert caches.counts() == {"gpu": 2, "cpu": 2}
    with pytest.raises(ValueError):
        Residency(cpu_capacity=0, gpu_capacity=1)
