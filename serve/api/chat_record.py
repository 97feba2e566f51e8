"""The last step of a chat request: what it leaves behind, settled exactly once.

`ChatRecord` is the chat handler's bookkeeping, an async context manager around its steps. It
releases what the request holds (its replica, its fair-queue slot, its concurrency slot and token
count, in that order: the next request must not wait for the rest), then records it:

- metrics by tenant, deployment, adapter and variant;
- in one worker-thread hand-off, only where one of them applies: the answer's format check, the
  drift monitor's sample of the request, the capture of the whole request for retraining;
- the rollout's sample, when a rollout measures the request;
- the request-log row, and the same row's usage with its cost (the usage ledger) and, for an
  answered request of a budgeted tenant, its spending against the budgets.

A request that fails before it is forwarded (a bad body, an unknown deployment, a full queue) is
only logged, without a deployment; one that fails on its way to the engine is recorded at once; an
answer when its body has been sent (a background task of the response). Every error raised inside
carries the rate-limit headers, as every response does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from types import TracebackType

from fastapi.responses import Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lorafleet.errors import LorafleetError
from lorafleet.serve.answer_format import answer_checker
from lorafleet.serve.api.forward import Forwarded, Usage
from lorafleet.serve.drift.monitor import SampleTicket
from lorafleet.serve.feedback.confidence import Confidence, summarize
from lorafleet.serve.feedback.request_log import LoggedRequest, new_request_id
from lorafleet.serve.fleet.fleet import EngineReplica
from lorafleet.serve.gateway import Gateway
from lorafleet.serve.limits import Admitted
from lorafleet.serve.route_cache import TenantEntry
from lorafleet.serve.types import Answer, Route
from lorafleet.serve.usage.prices import Prices

__all__ = ["ChatRecord"]

log = logging.getLogger("lorafleet.gateway")


class ChatRecord:
    """One chat request's bookkeeping, from admission to its request-log row."""

    def __init__(
        self,
        gateway: Gateway,
        tenant: TenantEntry,
        admitted: Admitted,
        batch_id: str | None = None,
    ) -> None:
        """`batch_id`: a batch's line, which holds a background slot of the fair queue."""
        self.gateway = gateway
        self.tenant = tenant
        self.admitted = admitted
        self.batch_id = batch_id
        self.request_id = new_request_id()
        self.started = time.perf_counter()
        self.usage = Usage()  # until `forwarding`: a request that reached no deployment
        self.route: Route | None = None  # set once the request holds an engine slot
        self.messages: list = []
        self.replica: EngineReplica | None = None  # set once the engine answered
        self.images = 0  # the request's images, once its body is read

    async def __aenter__(self) -> ChatRecord:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        self.usage.status, self.usage.error_code = _outcome(exc)
        if isinstance(exc, LorafleetError):
            exc.headers = {**self.admitted.headers, "x-request-id": self.request_id} | (
                exc.headers or {}
            )
        await self.settle()

    def forwarding(self, route: Route, body: dict, record_confidence: bool) -> Usage:
        """From here on the request is its deployment's: it holds an engine slot, and what the
        engine answers is counted for `route`'s variant."""
        self.route = route
        self.messages = body.get("messages") or []
        read_text = route.answer_format is not None or route.sample_inputs or bool(route.capture)
        self.usage = Usage(stream=bool(body.get("stream")))
        if read_text:
            self.usage.text = []
        if record_confidence:
            self.usage.logprobs = []
        return self.usage

    def respond(self, forwarded: Forwarded) -> Response:
        """The engine's response with the rate-limit headers; recorded once its body is sent."""
        self.replica = forwarded.replica
        response = forwarded.response
        response.headers.update(self.admitted.headers)
        response.background = BackgroundTask(self.settle)
        return response

    async def settle(self) -> None:
        """Release what the request holds, then record it."""
        gateway, usage = self.gateway, self.usage
        if self.replica is not None and self.route is not None:
            gateway.fleet.release(self.replica, self.route.digest)
        if self.route is not None and self.batch_id is not None:
            gateway.fair_queue.release_background(self.tenant.name)
        elif self.route is not None:
            gateway.fair_queue.release(self.tenant.name)
        await gateway.limiter.release(self.admitted, usage.prompt_tokens + usage.completion_tokens)
        latency_s = time.perf_counter() - self.started
        if self.route is None:
            await self._account(self._log_row(time.time(), latency_s))
        else:
            await self._record(self.route, latency_s)

    async def _account(self, row: LoggedRequest) -> None:
        """The request-log row, its usage and cost, and the budgets' spending."""
        gateway, tenant = self.gateway, self.tenant
        gateway.request_log.add(row)
        cost_nanos = 0
        if row.status == 200:
            prices = tenant.prices or Prices.defaults(gateway.settings)
            engine_s = (row.prefill_s or 0.0) + (row.decode_s or 0.0)
            cost_nanos = prices.cost_nanos(
                row.prompt_tokens, row.completion_tokens, row.images, engine_s
            )
        gateway.usage.add(row, cost_nanos)
        if tenant.budgets and row.status == 200:
            try:
                await gateway.budgets.spend(
                    tenant.id,
                    tenant.name,
                    tenant.budgets,
                    row.prompt_tokens + row.completion_tokens,
                    cost_nanos,
                )
            except Exception:  # noqa: BLE001 - the answer was served; the usage is recorded
                log.exception(
                    "counting request %s against %s's budgets failed", row.request_id, tenant.name
                )

    async def _record(self, route: Route, latency_s: float) -> None:
        gateway, usage, tenant = self.gateway, self.usage, self.tenant
        now = time.time()
        confidence = summarize(usage.logprobs) if usage.status == 200 else None
        self._count(route, latency_s, confidence)
        answer = Answer(
            usage.status,
            "".join(usage.text) if usage.text is not None else None,
            usage.completion_tokens,
            confidence.mean if confidence else None,
        )
        ticket = (
            gateway.drift.wants_sample(route.deployment_id)
            if route.sample_inputs and usage.status < 500
            else None
        )
        capture = answer.answered and answer.text is not None and gateway.capturer.wants(route, now)
        # an engine outage hits every variant alike and says nothing of the adapter
        measured = route.assignment is not None and usage.error_code != "engine_unavailable"
        checkable = answer.answered and answer.text is not None and route.answer_format is not None
        captured = False
        if ticket is not None or capture or (measured and checkable):  # else no thread work
            answer, captured = await run_in_threadpool(
                self._inspect, route, answer, ticket, capture, now
            )
            if captured:
                gateway.metrics.captures.labels(tenant.name, route.deployment).inc()
        if measured and route.assignment is not None:
            gateway.controller.samples.add(route.assignment, answer, latency_s, now)
        await self._account(self._log_row(now, latency_s, route, confidence, captured))

    def _count(self, route: Route, latency_s: float, confidence: Confidence | None) -> None:
        m, usage = self.gateway.metrics, self.usage
        labels = m.labels(self.tenant.name, route.deployment, route.digest, route.variant)
        m.requests.labels(*labels, str(usage.status)).inc()
        m.latency.labels(*labels).observe(latency_s)
        if usage.error_code:
            m.errors.labels(*labels, usage.error_code).inc()
        if usage.first_chunk_s is not None:
            m.ttft.labels(*labels).observe(usage.first_chunk_s)
        m.tokens.labels(*labels, "prompt").inc(usage.prompt_tokens)
        m.tokens.labels(*labels, "completion").inc(usage.completion_tokens)
        if confidence is not None:
            m.confidence.labels(*labels).observe(confidence.mean)

    def _inspect(
        self, route: Route, answer: Answer, ticket: SampleTicket | None, capture: bool, now: float
    ) -> tuple[Answer, bool]:
        """CPU work on a worker thread: the answer's format check, the drift sample's features,
        the capture. Returns the answer with its format checked, and whether it was captured."""
        gateway, captured = self.gateway, False
        try:
            if route.answer_format is not None and answer.answered and answer.text is not None:
                valid = answer_checker(route.answer_format)(answer.text)
                answer = dataclasses.replace(answer, format_valid=valid)
        finally:  # a drawn sample is always settled
            if ticket is not None:
                gateway.drift.keep(ticket, route.variant, self.messages, answer)
        if capture and answer.text is not None:
            try:
                captured = gateway.capturer.keep(
                    self.tenant.id, route, self.messages, answer.text, answer.confidence, now
                )
            except Exception:  # noqa: BLE001 - the answer was served; a failed capture is logged
                log.exception("capturing request %s failed", route.request_id)
        return answer, captured

    def _log_row(
        self,
        now: float,
        latency_s: float,
        route: Route | None = None,
        confidence: Confidence | None = None,
        captured: bool = False,
    ) -> LoggedRequest:
        usage = self.usage
        return LoggedRequest(
            request_id=self.request_id,
            tenant_id=self.tenant.id,
            key_id=self.tenant.key_id or None,
            at=now,
            status=usage.status,
            error_code=usage.error_code,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            latency_s=latency_s,
            stream=usage.stream,
            deployment_id=(route.deployment_id or None) if route else None,
            deployment=route.deployment if route else "",
            rollout_id=route.assignment.rollout_id if route and route.assignment else None,
            variant=route.variant if route else "",
            digest=route.digest if route else "",
            confidence_mean=confidence.mean if confidence else None,
            confidence_min=confidence.least if confidence else None,
            captured=captured,
            batch_id=self.batch_id,
            images=self.images,
            prefill_s=usage.prefill_s,
            decode_s=usage.decode_s,
        )


def _outcome(exc: BaseException) -> tuple[int, str]:
    """The status and error code a request that raised `exc` is recorded with."""
    if isinstance(exc, LorafleetError):
        return exc.status, str(exc.code)
    if isinstance(exc, asyncio.CancelledError):
        return 499, "client_closed"
    return 500, "internal_error"
