"""Fair share of the engine: at most `slots` chat requests are in the engine at once (its batch
size); when more wait, each freed slot goes to the waiting tenant with the fewest requests in the
engine, so a tenant that floods the gateway queues behind itself, not in front of the others.

vLLM schedules what it is sent first come, first served; without this a tenant with a deep backlog
would fill the engine's queue and every other tenant's request would wait behind all of it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from lorafleet.errors import EngineBusy

__all__ = ["FairQueue", "EngineBusy"]


class FairQueue:
    """Engine slots shared between tenants, max-min fair; `slots` is read at each decision (the
    engine's size can change when it restarts)."""

    def __init__(self, slots: Callable[[], int], timeout_s: float) -> None:
        self.slots = slots
        self.timeout_s = timeout_s
        self.running: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}

    @property
    def in_engine(self) -> int:
        return sum(self.running.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def acquire(self, tenant: str) -> None:
        """Return when the tenant's request may go to the engine; EngineBusy (503) after
        `timeout_s` of waiting."""
        if not self._waiting and self.in_engine < self.slots():
            self.running[tenant] += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, collections.deque()).append(turn)
        try:
            await asyncio.wait_for(turn, self.timeout_s)
        except TimeoutError:
            self._forget(tenant, turn)
            raise EngineBusy(
                f"the engine is saturated: this request waited {self.timeout_s:.0f} s for a slot; "
                "retry later"
            ) from None
        except asyncio.CancelledError:  # the client went away while waiting
            if turn.done() and not turn.cancelled():
                self.release(tenant)  # the slot came at that moment: pass it on
            else:
                self._forget(tenant, turn)
            raise

    def release(self, tenant: str) -> None:
        """A request of `tenant` left the engine: its slot goes to the next waiting request,
        fairly."""
        self.running[tenant] -= 1
        if self.running[tenant] <= 0:
            del self.running[tenant]
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting and self.in_engine < self.slots():
            # the fewest in the engine first; ties: the tenant waiting longest (dicts keep insertion
            # order)
            tenant = min(self._waiting, key=lambda t: self.running[t])
            queue = self._waiting[tenant]
            turn = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if not turn.done():
                self.running[tenant] += 1
                turn.set_result(None)

    def _forget(self, tenant: str, turn: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(turn)
            if not queue:
                del self._waiting[tenant]
        self._dispatch()
