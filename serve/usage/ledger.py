"""Usage on its way to the catalog: a gateway adds each request's usage to its tenant's row of the
day in memory (no catalog work per request) and writes every row it changed every
`LORAFLEET_USAGE_FLUSH_S`, and when it stops. A write that fails is kept and tried again with the
next: only a gateway killed outright loses usage, at most one flush period's.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from sqlalchemy.orm import sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.serve.feedback.request_log import LoggedRequest
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.usage.periods import utc_day
from lorafleet.serve.usage.records import UsageCounts, UsageKey, add_usage

__all__ = ["UsageLedger"]

log = logging.getLogger("lorafleet.usage")


class UsageLedger:
    """This gateway's usage not yet in the catalog, summed per `UsageKey`."""

    def __init__(self, sessions: sessionmaker, metrics: Metrics, flush_s: float) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.flush_s = flush_s
        self._pending: dict[UsageKey, UsageCounts] = {}
        self._lock = threading.Lock()  # requests add on the event loop, flushes drain in a thread
        self._flushing = threading.Lock()

    def add(self, request: LoggedRequest, cost_nanos: int) -> None:
        """Count one ended request (its request-log row) and what it cost."""
        key = UsageKey(
            request.tenant_id,
            utc_day(request.at),
            request.deployment,
            request.digest,
            request.batch_id is not None,
            request.status != 200,
        )
        counts = UsageCounts(
            1,
            request.prompt_tokens,
            request.completion_tokens,
            request.images,
            request.prefill_s or 0.0,
            request.decode_s or 0.0,
            cost_nanos,
        )
        with self._lock:
            if (pending := self._pending.get(key)) is None:
                self._pending[key] = counts
            else:
                pending.add(counts)

    def flush(self) -> int:
        """Write what is pending (blocking: a worker thread); return the rows written. On a
        failure the usage is kept for the next flush."""
        with self._flushing:
            with self._lock:
                usage, self._pending = self._pending, {}
            if not usage:
                return 0
            try:
                with self.sessions() as session:
                    add_usage(session, usage)
            except Exception:
                with self._lock:  # back in front of what came meanwhile
                    for key, counts in self._pending.items():
                        if key in usage:
                            usage[key].add(counts)
                        else:
                            usage[key] = counts
                    self._pending = usage
                self.metrics.usage_flush_failures.inc()
                log.exception(
                    "writing %d usage rows failed; they are kept and tried again", len(usage)
                )
                return 0
            return len(usage)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await run_in_threadpool(self.flush)

    async def stop(self) -> None:
        await run_in_threadpool(self.flush)
