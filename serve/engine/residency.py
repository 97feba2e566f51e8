"""Which adapters a replica holds in memory, as this gateway can tell: a model of vLLM's two LRU
caches, fed with what the gateway sends.

vLLM keeps an adapter's weights in two least-recently-used caches (`LRUCacheWorkerLoRAManager`):
the CPU cache (`max_cpu_loras` adapters) and, of those, the GPU slots a batch computes with
(`max_loras`). Registering an adapter (`/v1/load_lora_adapter`) and every request that names it
put it first in both; an adapter pushed out of the CPU cache stays registered, and the next request
for it reads it from disk again first (a cold load). vLLM's metrics show neither cache, so each
replica's `Residency` replays the same policy over the gateway's own loads and placements: it is
exact for a replica this gateway alone sends to, and a lower bound of the recency of others'
adapters on an engine node that several gateways share.

    GPU  (max_loras)       the adapters a batch can compute with at once: `gpu`
    CPU  (max_cpu_loras)   the adapters whose weights are in memory: `cpu` (GPU ones included)
    registered only        evicted: a request reads it from disk first (`cold`)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["Residency", "Touch", "TIERS"]

TIERS = ("gpu", "cpu")


@dataclass(frozen=True)
class Touch:
    """What one use of an adapter did to the caches: whether its weights had to be read from disk
    first (not in the CPU cache), and which adapters it pushed out of each tier."""

    cold: bool
    evicted_cpu: tuple[str, ...] = ()
    evicted_gpu: tuple[str, ...] = ()


class Residency:
    """One replica's two caches, most recently used last."""

    def __init__(self, cpu_capacity: int, gpu_capacity: int) -> None:
        if cpu_capacity < 1 or gpu_capacity < 1:
            raise ValueError("a replica holds at least one adapter in each tier")
        self.cpu_capacity = cpu_capacity
        self.gpu_capacity = min(gpu_capacity, cpu_capacity)
        self._cpu: OrderedDict[str, float] = OrderedDict()  # digest -> last use (monotonic)
        self._gpu: OrderedDict[str, None] = OrderedDict()

    def resize(self, cpu_capacity: int, gpu_capacity: int) -> None:
        """The engine's sizes (its start, or a restart with others); the least recently used go
        first where they shrank."""
        self.cpu_capacity, self.gpu_capacity = cpu_capacity, min(gpu_capacity, cpu_capacity)
        while len(self._cpu) > self.cpu_capacity:
            oldest, _ = self._cpu.popitem(last=False)
            self._gpu.pop(oldest, None)
        while len(self._gpu) > self.gpu_capacity:
            self._gpu.popitem(last=False)

    def touch(self, digest: str, now: float | None = None) -> Touch:
        """A load or a request of `digest`: first in both caches, the least recently used ones
        past each capacity pushed out."""
        cold = digest not in self._cpu
        self._cpu[digest] = time.monotonic() if now is None else now
        self._cpu.move_to_end(digest)
        self._gpu[digest] = None
        self._gpu.move_to_end(digest)
        evicted_cpu = []
        while len(self._cpu) > self.cpu_capacity:
            oldest, _ = self._cpu.popitem(last=False)
            evicted_cpu.append(oldest)
            self._gpu.pop(oldest, None)  # its weights left memory, so its slot too
        evicted_gpu = []
        while len(self._gpu) > self.gpu_capacity:
            oldest, _ = self._gpu.popitem(last=False)
            evicted_gpu.append(oldest)
        return Touch(cold, tuple(evicted_cpu), tuple(evicted_gpu))

    def forget(self, digest: str) -> None:
        """The adapter was unloaded from the engine (or the engine restarted without it)."""
        self._cpu.pop(digest, None)
        self._gpu.pop(digest, None)

    def clear(self) -> None:
        """The engine (re)started: nothing is in memory."""
        self._cpu.clear()
        self._gpu.clear()

    def tier(self, digest: str) -> str | None:
        """`gpu`, `cpu` (in memory, not in a slot), or None (a request reads it from disk)."""
        if digest in self._gpu:
            return "gpu"
        return "cpu" if digest in self._cpu else None

    def resident(self, digest: str) -> bool:
        return digest in self._cpu

    def idle_since(self, digest: str) -> float | None:
        """The monotonic time of the adapter's last load or request here (None: not resident)."""
        return self._cpu.get(digest)

    def counts(self) -> dict[str, int]:
        """Adapters in each tier (`cpu` counts the GPU ones too: their weights are in memory)."""
        return {"gpu": len(self._gpu), "cpu": len(self._cpu)}

    def digests(self, tier: str = "cpu") -> list[str]:
        """The adapters in memory (`cpu`, GPU ones included) or in GPU slots (`gpu`), least
        recently used first."""
        return list(self._gpu if tier == "gpu" else self._cpu)
