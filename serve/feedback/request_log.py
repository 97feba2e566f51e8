"""The request log: one row per chat request of a tenant, written to the catalog in batches.

The chat path only appends a `LoggedRequest` to a bounded buffer (no catalog work per request); a
loop writes the buffer every `request_log_flush_s`. Feedback may name a request whose row is still
in some gateway's buffer: it waits for the next write (`find_request`), this gateway's own buffer
being written at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass

from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import RequestRecord
from lorafleet.serve.metrics import Metrics
from lorafleet.serve.route_cache import ROUTE_NEUTRAL

__all__ = [
    "LoggedRequest",
    "RequestLog",
    "new_request_id",
    "logged_request_id",
    "REQUEST_ID_PREFIX",
    "RESPONSE_ID_PREFIX",
]

log = logging.getLogger("lorafleet.requests")

REQUEST_ID_PREFIX = "chatcmpl-"  # OpenAI's prefix of a chat completion's id
RESPONSE_ID_PREFIX = "resp_"  # and of a response's (the Responses API)
_REQUEST_ID = re.compile(r"chatcmpl-[0-9a-f]{32}")


@dataclass(frozen=True)
class LoggedRequest:
    """One row of the request log as the chat path hands it over: what a request cost and how it
    ended, never its content."""

    request_id: str
    tenant_id: int
    key_id: int | None
    at: float
    status: int
    error_code: str | None
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    stream: bool
    # where it went; a request that never reached a deployment (a bad body, an unknown model)
    # keeps these defaults
    deployment_id: int | None = None
    deployment: str = ""
    rollout_id: int | None = None
    variant: str = ""
    digest: str = ""
    confidence_mean: float | None = None
    confidence_min: float | None = None
    captured: bool = False
    batch_id: str | None = None  # a batch's line (OpenAI's Batch API), not a live request
    images: int = 0
    # the engine's own prefill and decode times, where it reported them
    prefill_s: float | None = None
    decode_s: float | None = None


def logged_request_id(answer_id: str) -> str:
    """The request log's id of an answer: a Responses API answer's `resp_` id names the request
    by the same digits."""
    if answer_id.startswith(RESPONSE_ID_PREFIX):
        return REQUEST_ID_PREFIX + answer_id.removeprefix(RESPONSE_ID_PREFIX)
    return answer_id


def new_request_id() -> str:
    """A request's id, as its response's `id` and `x-request-id` carry it. The engine is given
    the part after the prefix (vLLM's `X-Request-Id`), so the id it writes in the body is this
    one."""
    return REQUEST_ID_PREFIX + uuid.uuid4().hex


class RequestLog:
    """This gateway's request-log rows not yet in the catalog (bounded: the oldest are dropped
    and counted)."""

    def __init__(
        self, sessions: sessionmaker, metrics: Metrics, flush_s: float, max_pending: int = 100_000
    ) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.flush_s = flush_s
        self.max_pending = max_pending
        self._pending: deque[LoggedRequest] = deque()
        # requests add on the event loop, the flush drains in a worker thread
        self._lock = threading.Lock()
        # one write at a time: `find_request` may flush beside the loop
        self._flushing = threading.Lock()

    def add(self, row: LoggedRequest) -> None:
        with self._lock:
            if len(self._pending) >= self.max_pending:
                self._pending.popleft()
                self.metrics.request_log_dropped.inc()
            self._pending.append(row)

    def flush(self) -> int:
        """Write what is pending (blocking: a worker thread). Rows the catalog refuses are
        dropped and counted."""
        with self._flushing:
            with self._lock:
                rows, self._pending = list(self._pending), deque()
            if not rows:
                return 0
            try:
                with self.sessions() as session:
                    # the log changes no route: keep the route cache
                    session.info[ROUTE_NEUTRAL] = True
                    session.execute(insert(RequestRecord), [asdict(row) for row in rows])
                    session.commit()
            except Exception:
                self.metrics.request_log_dropped.inc(len(rows))
                log.exception("writing %d request-log rows failed; they are lost", len(rows))
                return 0
            return len(rows)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await run_in_threadpool(self.flush)

    async def stop(self) -> None:
        await run_in_threadpool(self.flush)

    def find_request(
        self, session: Session, tenant_id: int, request_id: str, wait_s: float
    ) -> RequestRecord | None:
        """The tenant's request of that id (blocking). A request served moments ago may still be
        in a gateway's buffer: this gateway's is written now, another's within its flush period,
        which this waits for."""
        query = select(RequestRecord).where(
            RequestRecord.tenant_id == tenant_id, RequestRecord.request_id == request_id
        )
        if not _REQUEST_ID.fullmatch(request_id):
            return None  # not an id this gateway gives out
        found = session.scalar(query)
        if found is not None:
            return found
        if (
            session.scalar(select(RequestRecord.id).where(RequestRecord.request_id == request_id))
            is not None
        ):
            return None  # another tenant's: not found, at once
        self.flush()
        deadline = time.monotonic() + wait_s
        while True:
            session.rollback()  # a new snapshot: another transaction may have committed the row
            found = session.scalar(query)
            if found is not None or time.monotonic() >= deadline:
                return found
            time.sleep(min(0.1, self.flush_s / 4))
