"""Engine sizing from the machine and the deployed adapters: pure rules, no engine."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lorafleet.adapters.validate import ENGINE_LORA_RANKS, engine_lora_rank
from lorafleet.serve.engine.sizing import (
    CACHE_RAM_SHARE,
    GIB,
    KV_RAM_SHARE,
    SET,
    SLOT_MEMORY_SHARE,
    Machine,
    ModelShape,
    Workload,
    derive_sizing,
)
from lorafleet.serve.settings import Settings

CPU = Machine(ram_bytes=24 * GIB, cpus=2)
GPU = Machine(ram_bytes=128 * GIB, cpus=16, gpu_memory_bytes=80 * GIB)
# the tiny Qwen2.5-VL in float32
TINY = ModelShape(lora_features=4096, kv_bytes_per_token=1024, dtype_bytes=4)
# a 7B-class base in bfloat16: 28 layers, 4 KV heads of 128
LARGE = ModelShape(lora_features=2_523_136, kv_bytes_per_token=2 * 28 * 4 * 128 * 2, dtype_bytes=2)


def _derive(
    workload: Workload = Workload(), machine: Machine = CPU, model: ModelShape = TINY, **settings
):
    return derive_sizing(Settings(base="x", **settings), workload, machine, model)


def test_explicit_values_are_used_as_they_are():
    sizing = _derive(
        Workload(64, 64),
        max_lora_rank=32,
        max_loras=4,
        max_cpu_loras=10,
        max_num_seqs=12,
        cpu_kvcache_gib=3,
    )
    assert (
        sizing.max_lora_rank,
        sizing.max_loras,
        sizing.max_cpu_loras,
        sizing.max_num_seqs,
        sizing.kvcache_gib,
    ) == (32, 4, 10, 12, 3)
    assert sizing.rank_is_set
    assert {
        sizing.max_loras_source,
        sizing.max_cpu_loras_source,
        sizing.max_num_seqs_source,
        sizing.kvcache_source,
    } == {SET}
    # deployed rank 64 > the fixed 32: said at start
    assert "will not load" in sizing.max_lora_rank_source


@pytest.mark.parametrize(
    ("deployed", "rank"), [(24, 32), (16, 16), (4, 8), (1, 1), (65, 128), (300, 320)]
)
def test_rank_is_the_smallest_vllm_takes_that_holds_the_largest_deployed(deployed, rank):
    sizing = _derive(Workload(3, deployed))
    assert sizing.max_lora_rank == rank and rank in ENGINE_LORA_RANKS
    assert f"largest deployed rank {deployed}" in sizing.max_lora_rank_source
    assert not sizing.rank_is_set


def test_rank_is_16_with_nothing_deployed_and_says_so():
    sizing = _derive(Workload())
    assert sizing.max_lora_rank == 16
    assert "no adapter deployed" in sizing.max_lora_rank_source


def test_no_rank_above_what_vllm_takes():
    with pytest.raises(ValueError, match="512"):
        engine_lora_rank(513)


@pytest.mark.parametrize("machine", [CPU, GPU])
def test_64_adapters_fit_in_the_batch_slots_and_the_warm_cache(machine):
    sizing = _derive(Workload(64, 16), machine)
    assert sizing.max_loras >= 64  # uniform traffic over 64 adapters never waits for a slot
    assert sizing.max_cpu_loras >= 2 * 64  # all of them warm, with room for rollouts' new versions


def test_gpu_slots_follow_the_deployed_adapters():
    assert [_derive(Workload(n, 16), GPU).max_loras for n in (0, 8, 10, 64, 1000)] == [
        8,
        8,
        16,
        64,
        256,
    ]


def test_cpu_slots_cover_a_whole_batch_even_before_anything_is_deployed():
    sizing = _derive(Workload(), CPU)
    assert sizing.max_loras == sizing.max_num_seqs == 64
    assert _derive(Workload(), CPU, max_num_seqs=16).max_loras == 16


def test_slots_stay_within_their_memory_share():
    small = Machine(ram_bytes=16 * GIB, cpus=4)
    sizing = _derive(Workload(64, 64), small, LARGE)
    assert (
        sizing.max_loras * LARGE.slot_bytes(sizing.max_lora_rank)
        <= SLOT_MEMORY_SHARE * small.ram_bytes
    )
    assert 1 <= sizing.max_loras < 64 and "MiB each at rank 64" in sizing.max_loras_source


@pytest.mark.parametrize("machine", [CPU, GPU, Machine(ram_bytes=4 * GIB, cpus=1)])
@pytest.mark.parametrize(
    "workload", [Workload(), Workload(1, 8), Workload(64, 16), Workload(500, 64)]
)
@pytest.mark.parametrize(
    "fixed", [{}, {"max_loras": 200}, {"max_num_seqs": 512}, {"max_cpu_loras": 16}]
)
def test_warm_cache_always_holds_a_batch_of_adapters(machine, workload, fixed):
    sizing = _derive(workload, machine, LARGE, **fixed)
    assert sizing.max_cpu_loras >= sizing.max_loras >= 1  # vLLM refuses to start otherwise


def test_the_warm_cache_is_a_ram_budget_not_what_was_deployed_at_start():
    # a gateway started empty holds thousands of small adapters in memory
    empty = _derive(Workload(), CPU)
    assert empty.max_cpu_loras == int(CPU.ram_bytes * CACHE_RAM_SHARE // TINY.slot_bytes(16))
    assert empty.max_cpu_loras > 2000 and "10% of RAM" in empty.max_cpu_loras_source
    # large adapters: as many as the budget holds, never fewer than the slots
    for machine in (CPU, GPU):
        large = _derive(Workload(8, 64), machine, LARGE)
        held = large.max_cpu_loras * LARGE.slot_bytes(64)
        assert large.max_cpu_loras == large.max_loras or held <= CACHE_RAM_SHARE * machine.ram_bytes
    # a larger rank: fewer of them
    assert _derive(Workload(1, 64), CPU).max_cpu_loras < empty.max_cpu_loras


def test_contradicting_settings_are_refused_before_the_engine_starts():
    with pytest.raises(ValueError, match="LORAFLEET_MAX_CPU_LORAS"):
        _derive(max_loras=32, max_cpu_loras=16)


def test_kv_cache_holds_the_batch_at_full_length_at_least_1_gib():
    assert _derive(max_model_len=512).kvcache_gib == 1  # 64 x 512 x 1 KiB = 32 MiB
    sizing = _derive(Workload(), Machine(ram_bytes=256 * GIB, cpus=32), LARGE)
    assert sizing.kvcache_gib == 7  # 64 sequences x 2048 tokens x 56 KiB = 7 GiB
    assert sizing.max_num_seqs == 64


def test_kv_cache_is_bounded_by_ram_and_the_batch_by_the_kv_cache():
    machine = Machine(ram_bytes=8 * GIB, cpus=4)
    sizing = _derive(Workload(), machine, LARGE)
    assert sizing.kvcache_gib == 2 == int(KV_RAM_SHARE * machine.ram_bytes / GIB)
    assert "capped" in sizing.kvcache_source
    assert sizing.max_num_seqs * 2048 * LARGE.kv_bytes_per_token <= sizing.kvcache_gib * GIB
    assert "KV cache" in sizing.max_num_seqs_source


def test_gpu_leaves_the_kv_cache_to_vllm():
    sizing = _derive(Workload(8, 16), GPU)
    assert sizing.kvcache_gib == 0 and "--gpu-memory-utilization" in sizing.kvcache_source
    assert sizing.max_num_seqs == 256


@pytest.mark.parametrize("machine", [CPU, GPU])
def test_every_value_says_where_it_came_from(machine):
    sizing = _derive(Workload(64, 16), machine)
    sources = [
        sizing.max_lora_rank_source,
        sizing.max_loras_source,
        sizing.max_cpu_loras_source,
        sizing.max_num_seqs_source,
        sizing.kvcache_source,
    ]
    assert all(sources) and SET not in sources
    line = sizing.describe()
    assert all(source in line for source in sources)
    assert f"max_loras {sizing.max_loras} (" in line


def test_a_cpu_engines_shares_are_of_the_ram_its_weights_leave():
    # Qwen2.5-VL-3B in bfloat16: 7 GiB of weights, 36 layers of 2 KV heads of 128
    weights = 7 * GIB
    base_3b = ModelShape(
        lora_features=1_870_848, kv_bytes_per_token=2 * 36 * 2 * 128 * 2, dtype_bytes=2
    )
    loaded = replace(base_3b, weight_bytes=weights)
    without, with_weights = (
        _derive(Workload(8, 64), CPU, base_3b),
        _derive(Workload(8, 64), CPU, loaded),
    )
    left = CPU.ram_bytes - weights
    assert with_weights.kvcache_gib == int(left * KV_RAM_SHARE // GIB) < without.kvcache_gib
    assert with_weights.max_loras * loaded.slot_bytes(64) <= SLOT_MEMORY_SHARE * left
    assert with_weights.max_cpu_loras * loaded.slot_bytes(64) <= CACHE_RAM_SHARE * left
    assert with_weights.max_loras < without.max_loras
    assert "RAM less the weights' 7.0 GiB" in with_weights.kvcache_source
    # everything the engine holds at rest stays under half of the RAM: room for a picture's
    # vision encoding, the gateway and the system
    at_rest = (
        weights
        + with_weights.kvcache_gib * GIB
        + (with_weights.max_loras + with_weights.max_cpu_loras) * loaded.slot_bytes(64)
    )
    assert at_rest < 0.7 * CPU.ram_bytes
    # on a GPU the weights are in GPU memory: the host's RAM shares do not change
    gpu = _derive(Workload(8, 64), GPU, loaded)
    assert gpu.max_cpu_loras == _derive(Workload(8, 64), GPU, base_3b).max_cpu_loras
