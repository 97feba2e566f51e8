"""Fair share of the engine: at most `slots` chat requests are in the engine at once (its batch
size); when more wait, each freed slot goes to the waiting tenant with the fewest requests in the
engine, so a tenant that floods the gateway queues behind itself, not in front of the others.

vLLM schedules what it is sent first come, first served; without this a tenant with a deep backlog
would fill the engine's queue and every other tenant's request would wait behind all of it.

Batch lines (OpenAI's Batch API) are background requests: one takes a free slot only when no live
request waits for it, and background ones hold at most `background_share` of the slots while live
traffic goes on; every slot only once no live request has come for `LIVE_IDLE_S` (live requests
arrive in gaps of their clients' think time: a batch filling the engine in such a gap would make
the next live request wait for a slot). They wait as long as it takes: a batch uses what live
traffic leaves.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable

from lorafleet.errors import EngineBusy

__all__ = ["FairQueue", "EngineBusy", "LIVE_IDLE_S"]

LIVE_IDLE_S = 2.0  # no live request for this long: background requests may take every slot


class FairQueue:
    """Engine slots shared between tenants, max-min fair; `slots` is read at each decision (the
    engine's size can change when it restarts)."""

    def __init__(
        self, slots: Callable[[], int], timeout_s: float, background_share: float = 1.0
    ) -> None:
        self.slots = slots
        self.timeout_s = timeout_s
        self.background_share = background_share
        self.running: collections.Counter[str] = collections.Counter()  # live requests
        self.background: collections.Counter[str] = collections.Counter()
        self._waiting: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._waiting_background: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._live_at = -LIVE_IDLE_S  # when a live request last came or went (monotonic)

    @property
    def in_engine(self) -> int:
        return sum(self.running.values()) + sum(self.background.values())

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def waiting_background(self) -> int:
        return sum(len(q) for q in self._waiting_background.values())

    async def acquire_background(self, tenant: str) -> None:
        """Return when a background request of the tenant (a batch line) may go to the engine:
        after every live request waiting, within the background's share; no timeout."""
        turn = asyncio.get_running_loop().create_future()
        self._waiting_background.setdefault(tenant, collections.deque()).append(turn)
        self._dispatch()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release_background(tenant)
            else:
                self._forget(tenant, turn, self._waiting_background)
            raise

    def release_background(self, tenant: str) -> None:
        self.background[tenant] -= 1
        if self.background[tenant] <= 0:
            del self.background[tenant]
        self._dispatch()

    def _background_room(self) -> bool:
        """Whether a background request may take a slot now."""
        slots = self.slots()
        if self._waiting or self.in_engine >= slots:
            return False
        if not self.running and time.monotonic() - self._live_at >= LIVE_IDLE_S:
            return True  # no live traffic: every slot
        return sum(self.background.values()) < max(1, int(slots * self.background_share))

    async def acquire(self, tenant: str) -> None:
        """Return when the tenant's request may go to the engine; EngineBusy (503) after
        `timeout_s` of waiting."""
        self._live_at = time.monotonic()
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
        self._live_at = time.monotonic()
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiting and self.in_engine < self.slots():
            self._hand_over(self._waiting, self.running)
        while self._waiting_background and self._background_room():
            self._hand_over(self._waiting_background, self.background)

    @staticmethod
    def _hand_over(
        waiting: dict[str, collections.deque[asyncio.Future[None]]],
        running: collections.Counter[str],
    ) -> None:
        """One slot to the tenant with the fewest of its kind in the engine; ties: the tenant
        waiting longest (dicts keep insertion order)."""
        tenant = min(waiting, key=lambda t: running[t])
        queue = waiting[tenant]
        turn = queue.popleft()
        if not queue:
            del waiting[tenant]
        if not turn.done():
            running[tenant] += 1
            turn.set_result(None)

    def _forget(
        self,
        tenant: str,
        turn: asyncio.Future[None],
        waiting: dict[str, collections.deque[asyncio.Future[None]]] | None = None,
    ) -> None:
        waiting = self._waiting if waiting is None else waiting
        queue = waiting.get(tenant)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(turn)
            if not queue:
                del waiting[tenant]
        self._dispatch()
