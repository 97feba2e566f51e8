"""The fleet simulator (`loadtests/sim_fleet.py`) runs, conserves requests, and ranks the
policies sensibly."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SIM_PATH = Path(__file__).resolve().parents[2] / "loadtests" / "sim_fleet.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sim_fleet", SIM_PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["sim_fleet"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_a_tiny_simulation_conserves_requests(sim):
    for policy in ("random", "least_loaded", "affinity", "bounded_affinity"):
        result = sim.simulate(
            policy, 4, 4, sim.PROFILES["cpu-measured"], duration_s=2.0, seed=3, rate=200.0
        )
        assert result.arrived > 200
        assert result.arrived == result.completed + result.in_flight
        assert result.completed > 0 and 0.0 <= result.hit_rate <= 1.0


def test_the_same_seed_gives_the_same_run(sim):
    runs = [
        sim.simulate(
            "bounded_affinity", 4, 4, sim.PROFILES["cpu-measured"], 2.0, seed=5, rate=200.0
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_bounded_affinity_hits_the_gpu_slots_more_often_than_random(sim):
    profile = sim.PROFILES["cpu-measured"]
    random_, bounded = (
        sim.simulate(policy, 8, 8, profile, duration_s=4.0, seed=1, load=0.5)
        for policy in ("random", "bounded_affinity")
    )
    assert bounded.hit_rate > random_.hit_rate + 0.1
    assert bounded.loads_per_s < random_.loads_per_s
