"""How large the engine is: vLLM's adapter slots, batch size and KV cache, derived from this machine
and the adapters the catalog serves, unless a setting fixes them (LORAFLEET_MAX_LORAS etc.; 0 means
derived).

`derive_sizing` is pure: the catalog's workload, the machine and the base's shape are its arguments,
and every value comes back with where it came from ("set", or the reason it was derived), which
`lorafleet serve` prints. Facts behind the rules were measured with vLLM 0.32 on CPU (the
comments below say what and how).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lorafleet.adapters.base_model import base_config, load_base_spec
from lorafleet.adapters.validate import engine_lora_rank
from lorafleet.serve.settings import Settings

__all__ = [
    "EngineSizing",
    "Machine",
    "ModelShape",
    "Workload",
    "SET",
    "derive_sizing",
    "model_shape",
    "this_machine",
    "sizing_for",
    "NOTHING_DEPLOYED",
]

SET = "set"  # the source of a value a setting fixed
GIB = 1024**3
RANK_WHEN_NONE_DEPLOYED = 16  # vLLM's own default max LoRA rank
MIN_LORAS = 8  # on a GPU, slots for at least this many adapters (the old fixed default)
# what the load tests drive the CPU engine with (1-64 clients); vLLM's CPU default is 128
CPU_NUM_SEQS = 64
GPU_NUM_SEQS = 256  # vLLM's default for its OpenAI server on GPUs under 70 GiB (1024 above)
# Shares of RAM are of what the base's weights leave on a CPU engine (with shares of all RAM, a 3B
# base's engine held 17.6 GiB of a 24 GiB machine at rest; 15.9 GiB with shares of what is left)
SLOT_MEMORY_SHARE = 0.10  # of RAM (CPU) or GPU memory: the most all adapter slots together may take
CACHE_RAM_SHARE = 0.10  # of RAM: the most vLLM's LRU of adapters in memory may take
KV_RAM_SHARE = 0.25  # of RAM: the most the CPU engine's KV cache may take
MIN_KV_GIB = 1  # VLLM_CPU_KVCACHE_SPACE is whole GiB; 1 GiB was the old fixed value


@dataclass(frozen=True)
class Workload:
    """What the catalog serves: distinct adapters of deployments and active rollouts, and their
    largest rank."""

    adapters: int = 0
    max_rank: int = 0  # 0: none deployed


NOTHING_DEPLOYED = Workload()


@dataclass(frozen=True)
class Machine:
    ram_bytes: int  # physical RAM, or the container's memory limit if lower
    cpus: int  # CPUs this process may run on
    gpu_memory_bytes: int | None = None  # the first CUDA device's; None: the CPU engine

    @property
    def gpu(self) -> bool:
        return self.gpu_memory_bytes is not None

    def describe(self) -> str:
        gpu = (
            f"{self.gpu_memory_bytes / GIB:.0f} GiB GPU"
            if self.gpu_memory_bytes is not None
            else "no GPU"
        )
        return f"{self.cpus} CPUs, {self.ram_bytes / GIB:.0f} GiB RAM, {gpu}"


@dataclass(frozen=True)
class ModelShape:
    """What the engine's memory per adapter slot and per token depends on, from the base's
    config."""

    # sum of (in + out) features over the language model's LoRA-able linear layers
    lora_features: int
    kv_bytes_per_token: int  # 2 (K and V) x layers x KV heads x head dim x dtype bytes
    dtype_bytes: int  # the engine's (and its LoRA weights') dtype
    weight_bytes: int = 0  # the base's weights as the engine holds them

    def slot_bytes(self, rank: int) -> int:
        """One adapter slot: vLLM allocates lora_a [rank, in] and lora_b [out, rank] for every
        LoRA-able layer."""
        return rank * self.lora_features * self.dtype_bytes


@dataclass(frozen=True)
class EngineSizing:
    """vLLM's engine settings, each with its source: "set" (a LORAFLEET_ setting) or why it was
    derived."""

    max_lora_rank: int
    max_loras: int
    max_cpu_loras: int
    max_num_seqs: int
    # VLLM_CPU_KVCACHE_SPACE; 0 on a GPU (vLLM sizes KV from --gpu-memory-utilization)
    kvcache_gib: int
    max_lora_rank_source: str
    max_loras_source: str
    max_cpu_loras_source: str
    max_num_seqs_source: str
    kvcache_source: str
    machine: Machine
    model: ModelShape

    @property
    def rank_is_set(self) -> bool:
        """Whether LORAFLEET_MAX_LORA_RANK fixes the rank (it does not grow with the deployed
        adapters)."""
        return self.max_lora_rank_source.split(";")[0] == SET

    def describe(self) -> str:
        """One line: every value and its source."""
        kv = f"{self.kvcache_gib} GiB" if self.kvcache_gib else "by vLLM"
        return (
            f"max_lora_rank {self.max_lora_rank} ({self.max_lora_rank_source}), "
            f"max_loras {self.max_loras} ({self.max_loras_source}), "
            f"max_cpu_loras {self.max_cpu_loras} ({self.max_cpu_loras_source}), "
            f"max_num_seqs {self.max_num_seqs} ({self.max_num_seqs_source}), KV cache {kv} "
            f"({self.kvcache_source}); on {self.machine.describe()}"
        )

    def as_dict(self) -> dict[str, int | str]:
        return {
            "max_lora_rank": self.max_lora_rank,
            "max_loras": self.max_loras,
            "max_cpu_loras": self.max_cpu_loras,
            "max_num_seqs": self.max_num_seqs,
            "kvcache_gib": self.kvcache_gib,
            "summary": self.describe(),
        }


def derive_sizing(
    settings: Settings, workload: Workload, machine: Machine, model: ModelShape
) -> EngineSizing:
    """The engine's settings for this workload on this machine; a value that `settings` fixes
    (non-zero) is kept."""
    rank, rank_source = _max_lora_rank(settings.max_lora_rank, workload)
    seqs, seqs_source = _max_num_seqs(settings.max_num_seqs, machine)
    kv, kv_source = _kvcache_gib(
        settings.cpu_kvcache_gib, seqs, settings.max_model_len, machine, model
    )
    if not settings.max_num_seqs and kv:
        seqs, seqs_source = _within_kvcache(seqs, seqs_source, kv, settings.max_model_len, model)
    loras, loras_source = _max_loras(settings, workload, seqs, rank, machine, model)
    cpu_loras, cpu_loras_source = _max_cpu_loras(
        settings.max_cpu_loras, loras, rank, machine, model
    )
    if cpu_loras < loras:
        raise ValueError(
            f"LORAFLEET_MAX_CPU_LORAS ({cpu_loras}) must be >= LORAFLEET_MAX_LORAS ({loras}): vLLM "
            "keeps every adapter of a batch among those it keeps warm"
        )
    return EngineSizing(
        rank,
        loras,
        cpu_loras,
        seqs,
        kv,
        rank_source,
        loras_source,
        cpu_loras_source,
        seqs_source,
        kv_source,
        machine,
        model,
    )


def _max_lora_rank(fixed: int, workload: Workload) -> tuple[int, str]:
    # vLLM pads every slot to max_lora_rank and its CPU LoRA ops gather [tokens, rank, features] per
    # layer: one shrink+expand at hidden 2048 and 64 tokens took 1.6 ms at rank 16 and 38 ms at rank
    # 64 (one thread here), so the rank follows the largest deployed adapter instead of a fixed 64
    if fixed:
        if workload.max_rank > fixed:
            return fixed, f"{SET}; adapters of the deployed rank {workload.max_rank} will not load"
        return fixed, SET
    if not workload.max_rank:
        return RANK_WHEN_NONE_DEPLOYED, "no adapter deployed yet; grows with the first larger one"
    rank = engine_lora_rank(workload.max_rank)
    rounded = "" if rank == workload.max_rank else ", rounded up to one vLLM takes"
    return rank, f"largest deployed rank {workload.max_rank}{rounded}"


def _max_num_seqs(fixed: int, machine: Machine) -> tuple[int, str]:
    if fixed:
        return fixed, SET
    if machine.gpu:
        return GPU_NUM_SEQS, "GPU: vLLM's OpenAI-server default"
    return CPU_NUM_SEQS, "CPU engine"


def _kvcache_gib(
    fixed: int, seqs: int, max_model_len: int, machine: Machine, model: ModelShape
) -> tuple[int, str]:
    if fixed:
        return fixed, SET
    # the CPU-only variable; on a GPU vLLM fills --gpu-memory-utilization with KV blocks
    if machine.gpu:
        return 0, "GPU: vLLM sizes it from --gpu-memory-utilization"
    # room for every batch sequence at full length: conservative (most are shorter), never above a
    # RAM share
    need = seqs * max_model_len * model.kv_bytes_per_token
    cap = max(MIN_KV_GIB, int(_ram(machine, model) * KV_RAM_SHARE // GIB))
    reason = f"{seqs} sequences x {max_model_len} tokens x {model.kv_bytes_per_token} B"
    if need > cap * GIB:
        return cap, f"{reason}, capped at {KV_RAM_SHARE:.0%} of {_ram_name(machine, model)}"
    if need < MIN_KV_GIB * GIB:
        return MIN_KV_GIB, f"{reason}, at least {MIN_KV_GIB} GiB"
    return math.ceil(need / GIB), reason


def _within_kvcache(
    seqs: int, source: str, kv_gib: int, max_model_len: int, model: ModelShape
) -> tuple[int, str]:
    """A derived batch no larger than the KV cache holds at full length."""
    fits = max(1, kv_gib * GIB // (max_model_len * model.kv_bytes_per_token))
    return (
        (seqs, source)
        if fits >= seqs
        else (fits, f"{source}, as many as {kv_gib} GiB of KV cache holds")
    )


def _max_loras(
    settings: Settings,
    workload: Workload,
    seqs: int,
    rank: int,
    machine: Machine,
    model: ModelShape,
) -> tuple[int, str]:
    # vLLM schedules requests of at most max_loras distinct adapters per step, so traffic spread
    # over more adapters than that queues for slots: 64 adapters with uniform traffic gave 54 req/s
    # at max_loras 8 and 84 at 32 (1 adapter: 80-92). A slot costs no time per step: the CPU LoRA
    # ops index each token's adapter (one shrink+expand took the same time with 8 and 64 slots,
    # measured here) and the GPU kernels' grid spans the active adapters only. A slot costs memory
    # (slot_bytes), which on a GPU comes out of the KV cache: the CPU engine gets one slot per batch
    # sequence, a GPU only what the deployed adapters need (at least MIN_LORAS).
    if settings.max_loras:
        return settings.max_loras, SET
    if machine.gpu:
        wanted = min(seqs, max(MIN_LORAS, _power_of_two_at_least(workload.adapters)))
        reason = (
            f"{_deployed(workload.adapters)}: a power of two, at least {MIN_LORAS}, "
            "at most max_num_seqs"
        )
    else:
        wanted, reason = seqs, "one per batch sequence: a slot costs the CPU engine no time"
    if settings.max_cpu_loras and settings.max_cpu_loras < wanted:
        wanted, reason = settings.max_cpu_loras, "at most LORAFLEET_MAX_CPU_LORAS"
    memory = (
        machine.gpu_memory_bytes if machine.gpu_memory_bytes is not None else _ram(machine, model)
    )
    fits = max(1, int(memory * SLOT_MEMORY_SHARE // model.slot_bytes(rank)))
    if fits < wanted:
        where = "GPU memory" if machine.gpu else _ram_name(machine, model)
        share = f"{SLOT_MEMORY_SHARE:.0%} of {where}"
        return (
            fits,
            f"as many slots as {share} holds "
            f"({model.slot_bytes(rank) / 1024**2:.0f} MiB each at rank {rank})",
        )
    return wanted, reason


def _max_cpu_loras(
    fixed: int, loras: int, rank: int, machine: Machine, model: ModelShape
) -> tuple[int, str]:
    # vLLM's LRU of adapters in (host) memory, filled as adapters are registered and used: one that
    # left it is read from disk again, blocking the engine's step while it loads. Sized by a RAM
    # budget, not by what is deployed at start: a gateway started empty and given 2,000 adapters
    # held 64 and read 465 of every 1,000 Zipf-distributed requests' adapters from disk
    # (bench_many_adapters). A cached adapter holds its own rank and targets: at most a slot.
    if fixed:
        return fixed, SET
    fits = int(_ram(machine, model) * CACHE_RAM_SHARE // model.slot_bytes(rank))
    if fits <= loras:
        return loras, "max_loras: every slot's adapter stays in memory"
    return fits, (
        f"as many as {CACHE_RAM_SHARE:.0%} of {_ram_name(machine, model)} holds, "
        f"{model.slot_bytes(rank) / 1024**2:.2f} MiB each at most at rank {rank}"
    )


def _ram(machine: Machine, model: ModelShape) -> int:
    """The RAM the shares are of: what the weights leave on a CPU engine (on a GPU they are in
    GPU memory)."""
    return machine.ram_bytes if machine.gpu else max(0, machine.ram_bytes - model.weight_bytes)


def _ram_name(machine: Machine, model: ModelShape) -> str:
    if machine.gpu or model.weight_bytes < machine.ram_bytes // 100:  # a tiny base
        return "RAM"
    return f"RAM less the weights' {model.weight_bytes / GIB:.1f} GiB"


def _deployed(adapters: int) -> str:
    return f"{adapters} deployed adapter{'' if adapters == 1 else 's'}"


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _memory_limit_bytes() -> int | None:
    """The cgroup's memory limit (a container's), if there is one."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return int(text)
    return None


def this_machine(gpu: bool) -> Machine:
    """RAM (or the container's limit), usable CPUs and, with `gpu`, the first CUDA device's
    memory."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _memory_limit_bytes()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpu_memory = None
    if gpu:
        import torch

        gpu_memory = torch.cuda.get_device_properties(0).total_memory
    return Machine(min(ram, limit) if limit else ram, cpus, gpu_memory)


def model_shape(base: str, dtype: str) -> ModelShape:
    """The base's LoRA-able features and KV bytes per token (from its config) in the engine's
    dtype."""
    text = base_config(base).get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    # vLLM's "auto" serves float32 checkpoints in 16 bits
    width = 4 if dtype in ("float32", "float") else 2
    spec = load_base_spec(base)
    # vLLM sizes every slot for the tower's and connector's LoRA too where it applies it there (the
    # engine does unless LORAFLEET_TOWER_LORA=off, when this overestimates a little)
    layers = [*spec.lora_modules.values(), *spec.tower_modules.values()]
    features = sum(i + o for i, o in layers)
    weights = spec.parameters * width
    files = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
    return ModelShape(
        lora_features=features,
        kv_bytes_per_token=2 * text.num_hidden_layers * kv_heads * head_dim * width,
        dtype_bytes=width,
        # a quantized checkpoint's files hold fewer bytes than its parameters at `width`
        weight_bytes=min(weights, files) if files else weights,
    )


def sizing_for(
    settings: Settings, cuda: bool, dtype: str, workload: Workload = NOTHING_DEPLOYED
) -> EngineSizing:
    """The sizing for `settings` and `workload` on this machine, the engine running in `dtype`."""
    return derive_sizing(settings, workload, this_machine(cuda), model_shape(settings.base, dtype))
