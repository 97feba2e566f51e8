"""Runs the fleet's batches: every `batch_tick_s` (or at once when one is created or cancelled)
a gateway claims the unfinished batches whose lease ran out and renews its own
(`lorafleet.serve.batches.records.claim`), and runs each it holds:

    start        validating -> in progress
    run lines    the input file's lines without a finished row, `batch_concurrency` at a time,
                 each through the chat path as a background request of the fair queue
                 (`chat.serve_line`: the deployment's routing, rollouts, answer format, capture and
                 the request log apply); each answer is recorded and counted in one transaction
                 (`record_line`) while this gateway holds the batch. An engine that is down makes
                 a line wait and try again, never fail.
    finish       when every line has finished, or it was cancelled, or its completion window ended:
                 the output and error files into the file store, the batch completed, cancelled or
                 expired

It lives beside the chat path it runs lines through. A gateway killed mid-batch loses only the lines
in flight (not recorded: run again by whoever takes the batch over, this gateway after a restart
included, once its lease has run out); a finished line is never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from lorafleet.adapters.catalog import Batch, BatchLine, StoredFile, Tenant, TenantPolicy
from lorafleet.errors import ServiceUnavailable
from lorafleet.serve.api.chat import Answered, serve_line
from lorafleet.serve.batches import records
from lorafleet.serve.batches.lines import RequestLine, read_lines
from lorafleet.serve.batches.results import result_files
from lorafleet.serve.gateway import Gateway
from lorafleet.serve.route_cache import TenantEntry

__all__ = ["BatchRunner"]

log = logging.getLogger("lorafleet.batches")


class _LeaseLost(Exception):
    """Another gateway holds the batch now: stop without writing anything more."""


class BatchRunner:
    """This gateway's share of the fleet's batches."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.owner = ""  # this gateway's id, as its rollout leases name it (from `run`)
        self.running: dict[str, asyncio.Task] = {}
        self._stopping: dict[str, str] = {}  # batch id -> how it ends early: cancelled | expired
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake(self) -> None:
        """Look for batches now (callable from any thread)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self.owner = f"batches:{self.gateway.controller.owner}"
        self._loop = asyncio.get_running_loop()
        while True:
            try:
                await self.tick()
            except Exception:  # the catalog may be briefly unavailable: the next tick
                log.exception("looking for batches failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.gateway.settings.batch_tick_s)
            self._wake.clear()

    async def tick(self) -> None:
        settings = self.gateway.settings
        now = time.time()
        held = await run_in_threadpool(self._claim, now, settings.batch_lease_s)
        for batch_id in set(self.running) - set(held):  # taken over (our lease ran out)
            log.warning("batch %s is another gateway's now; stopping here", batch_id)
            self.running.pop(batch_id).cancel()
        for batch_id, (status, expires_at) in held.items():
            if status == "cancelling":
                self._stopping[batch_id] = "cancelled"
            elif now >= expires_at:
                self._stopping.setdefault(batch_id, "expired")
            if batch_id not in self.running:
                task = asyncio.create_task(self._run(batch_id), name=f"batch-{batch_id}")
                self.running[batch_id] = task
                task.add_done_callback(functools.partial(self._done, batch_id))

    def _done(self, batch_id: str, _: asyncio.Task) -> None:
        self.running.pop(batch_id, None)
        self._stopping.pop(batch_id, None)

    def _claim(self, now: float, lease_s: float) -> dict[str, tuple[str, float]]:
        with self.gateway.sessions() as session:
            held = records.claim(session, self.owner, now, lease_s)
            if not held:
                return {}
            rows = session.execute(
                select(Batch.id, Batch.status, Batch.expires_at).where(Batch.id.in_(held))
            )
            return {batch_id: (status, expires_at) for batch_id, status, expires_at in rows}

    async def stop(self) -> None:
        """At shutdown: stop every batch here (its lines in flight are run again by whoever
        takes it over); the leases run out."""
        tasks = list(self.running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # one batch

    async def _run(self, batch_id: str) -> None:
        try:
            plan = await run_in_threadpool(self._plan, batch_id)
            if plan is None:
                return
            tenant, requests, done = plan
            pending = [r for r in requests if r.line not in done]
            if pending and batch_id not in self._stopping:
                log.info(
                    "batch %s: %d of %d lines to run (tenant %s)",
                    batch_id,
                    len(pending),
                    len(requests),
                    tenant.name,
                )
                await self._run_lines(batch_id, tenant, pending)
            await run_in_threadpool(self._finish, batch_id, tenant, requests)
        except _LeaseLost:
            log.warning("batch %s: lost its lease; another gateway goes on with it", batch_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "batch %s failed here; it is taken over when its lease runs out", batch_id
            )

    def _plan(self, batch_id: str) -> tuple[TenantEntry, list[RequestLine], set[int]] | None:
        """The batch's tenant, its requests and the lines already finished; the batch started
        (validating -> in progress), or failed where its input cannot be read."""
        gateway = self.gateway
        with gateway.sessions() as session:
            batch = session.get(Batch, batch_id)
            if batch is None or batch.owner != self.owner:
                return None
            tenant = session.get_one(Tenant, batch.tenant_id)
            policy = session.get(TenantPolicy, tenant.id)
            limits = gateway.route_cache.defaults or None
            entry = TenantEntry(
                tenant.id,
                tenant.name,
                tenant.sample_inputs,
                limits=limits.overridden(policy.limits if policy else None) if limits else None,
            )
            source = session.get(StoredFile, batch.input_file_id)
            try:
                if source is None:
                    raise ValueError(f"its input file {batch.input_file_id} was deleted")
                data = gateway.file_store.read(source.digest)
                # (checked at upload; a deployment gone since answers 404 on its lines)
                requests = read_lines(data, len(data) + 1, 0, None)
            except Exception as exc:  # noqa: BLE001 - the batch fails, saying why
                batch.errors = [{"code": "invalid_input_file", "message": str(exc)[:500]}]
                session.commit()
                records.finish(session, batch_id, self.owner, "failed", None, None, time.time())
                return None
            done = set(
                session.scalars(select(BatchLine.line).where(BatchLine.batch_id == batch_id))
            )
            records.start(session, batch_id, self.owner, time.time())
        return entry, requests, done

    async def _run_lines(
        self, batch_id: str, tenant: TenantEntry, pending: list[RequestLine]
    ) -> None:
        queue: asyncio.Queue[RequestLine] = asyncio.Queue()
        for request in pending:
            queue.put_nowait(request)

        async def worker() -> None:
            while batch_id not in self._stopping:
                try:
                    request = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await self._run_line(batch_id, tenant, request)

        workers = min(self.gateway.settings.batch_concurrency, len(pending))
        await asyncio.gather(*(worker() for _ in range(workers)))

    async def _run_line(self, batch_id: str, tenant: TenantEntry, request: RequestLine) -> None:
        while True:
            try:
                answered = await serve_line(self.gateway, tenant, request.body, batch_id)
                break
            except ServiceUnavailable:  # the engine is down or saturated: wait, never fail
                if batch_id in self._stopping:
                    return
                await asyncio.sleep(self.gateway.settings.retry_after_s)
            except Exception:  # a fault of ours: this line fails (500), the batch goes on
                log.exception("batch %s: line %d failed", batch_id, request.line)
                error = {
                    "message": "internal error",
                    "type": "server_error",
                    "code": "internal_error",
                }
                answered = Answered(500, {"error": error}, "")
                break
        row = BatchLine(
            batch_id=batch_id,
            line=request.line,
            custom_id=request.custom_id,
            request_id=answered.request_id,
            status=answered.status,
            body=answered.body,
            at=time.time(),
        )
        recorded = await run_in_threadpool(self._record, batch_id, row)
        if recorded.lost:
            raise _LeaseLost(batch_id)

    def _record(self, batch_id: str, row: BatchLine) -> records.Recorded:
        with self.gateway.sessions() as session:
            return records.record_line(session, batch_id, self.owner, row)

    def _finish(self, batch_id: str, tenant: TenantEntry, requests: list[RequestLine]) -> None:
        """Write the output and error files and end the batch: completed, or as it was stopped."""
        gateway, now = self.gateway, time.time()
        ending = self._stopping.get(batch_id, "completed")
        with gateway.sessions() as session:
            if ending == "completed":
                records.finalizing(session, batch_id, self.owner, now)
            finished = records.finished_lines(session, batch_id)
            if ending == "completed" and len(finished) < len(requests):
                return  # (stopped early without a reason: taken over; the next holder finishes)
            output, errors = result_files(batch_id, requests, finished, ending)
            files = {}
            for kind, data in (("output", output), ("error", errors)):
                if not data:
                    continue
                digest = gateway.file_store.put(data)
                stored = records.add_file(
                    session,
                    tenant.id,
                    "batch_output",
                    f"{batch_id}_{kind}.jsonl",
                    digest,
                    len(data),
                    data.count(b"\n"),
                    0,  # a batch's own results are kept whatever the file limit
                    now,
                )
                files[kind] = stored.id
            if records.finish(
                session, batch_id, self.owner, ending, files.get("output"), files.get("error"), now
            ):
                log.info(
                    "batch %s %s: %d lines answered, output %s, errors %s",
                    batch_id,
                    ending,
                    len(finished),
                    files.get("output"),
                    files.get("error"),
                )
