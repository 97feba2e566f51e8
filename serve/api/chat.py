"""The OpenAI-compatible surface: `/v1/chat/completions` and a per-tenant `/v1/models`.

A chat request reads as its steps: authenticate -> resolve the deployment -> ensure the adapter is
loaded -> forward -> record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lorafleet.errors import EngineUnavailable, InvalidRequest, LorafleetError, RateLimited
from lorafleet.serve.answer_format import answer_checker
from lorafleet.serve.api.dependencies import Gateway
from lorafleet.serve.api.forward import Route, Usage, forward_chat
from lorafleet.serve.drift.monitor import SampleTicket
from lorafleet.serve.feedback.confidence import summarize
from lorafleet.serve.feedback.request_log import new_request_id
from lorafleet.serve.fleet.fleet import Fleet
from lorafleet.serve.images import ImageLimits, admit_images
from lorafleet.serve.limits import Admitted, Limits
from lorafleet.serve.rollouts.routing import bucket_of, choose, unit_of
from lorafleet.serve.route_cache import DeploymentEntry, TenantEntry

__all__ = ["router", "read_chat_body"]

router = APIRouter(prefix="/v1")

log = logging.getLogger("lorafleet.gateway")


# OpenAI's chat bodies nest about 6 deep (tool schemas more); the engine re-encodes the body
MAX_JSON_DEPTH = 64


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


async def read_chat_body(request: Request) -> dict[str, Any]:
    """Parse the JSON body; only the fields the gateway needs are checked, the engine checks the
    rest."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise InvalidRequest("the body is nested too deeply", code="json_too_deep") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    if _depth_exceeds(body, MAX_JSON_DEPTH):
        raise InvalidRequest(
            f"the body is nested deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep"
        )
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest(
            "'model' is required: the name of one of your deployments", code="model_required"
        )
    if not isinstance(body.get("messages"), list):
        raise InvalidRequest("'messages' must be a list")
    return body


def _route(
    tenant: TenantEntry,
    deployment: DeploymentEntry,
    body: dict,
    headers: Mapping[str, str],
    request_id: str,
) -> Route:
    """Which adapter serves this request of the deployment: the stable one, or the variant the
    request's unit is assigned to while a rollout runs."""
    digest, variant, sample = deployment.stable_digest, "stable", None
    if (rollout := deployment.rollout) is not None:
        unit = unit_of(body, headers)
        chosen = choose(
            rollout.variants, bucket_of(rollout.salt, tenant.name, deployment.name, unit)
        )
        digest, variant = chosen.digest, chosen.label
        sample = {
            "rollout_id": rollout.id,
            "step_index": rollout.step_index,
            "variant": chosen.label,
            "unit": hashlib.sha256(unit.encode()).hexdigest()[:16],
        }
    return Route(
        deployment=deployment.name,
        digest=digest,
        variant=variant,
        sample=sample,
        answer_format=deployment.answer_format,
        deployment_id=deployment.id,
        sample_inputs=tenant.sample_inputs and deployment.validation_set_id is not None,
        request_id=request_id,
        capture=deployment.capture,
        headers={
            "x-request-id": request_id,
            "x-lorafleet-deployment": deployment.name,
            "x-lorafleet-adapter": digest,
            "x-lorafleet-variant": variant,
        },
    )


def _inspect(
    route: Route,
    messages: list,
    text: str | None,
    answered: bool,
    checkable: bool,
    ticket: SampleTicket | None,
    capture: tuple[int, float] | None,
    gateway: Gateway,
    usage: Usage,
    confidence: float | None,
) -> tuple[bool | None, bool]:
    """CPU work on a worker thread: the answer's format check, the drift sample's features, the
    capture."""
    valid, captured = None, False
    try:
        if checkable and text is not None and route.answer_format is not None:
            valid = answer_checker(route.answer_format)(text)
    finally:  # a drawn sample is always settled
        if ticket is not None:
            gateway.drift.keep(
                ticket,
                route.variant,
                messages,
                answered,
                text,
                usage.completion_tokens,
                valid,
                confidence,
            )
    if capture is not None and text is not None:
        tenant_id, now = capture
        try:
            captured = gateway.capture.keep(tenant_id, route, messages, text, confidence, now)
        except Exception:  # noqa: BLE001 - the answer was served; a failed capture is only logged
            log.exception("capturing request %s failed", route.request_id)
    return valid, captured


async def _record(
    gateway: Gateway,
    tenant: TenantEntry,
    route: Route,
    usage: Usage,
    t0: float,
    messages: list,
    admitted: Admitted | None = None,
) -> None:
    if usage.replica is not None:
        gateway.fleet.done(usage.replica)
    # first: the slots and the token count do not wait for the bookkeeping below
    if admitted is not None:
        gateway.fair_queue.release(tenant.name)
        await gateway.limiter.release(admitted, usage.prompt_tokens + usage.completion_tokens)
    m = gateway.metrics
    latency = time.perf_counter() - t0
    now = time.time()
    labels = m.labels(tenant.name, route.deployment, route.digest, route.variant)
    m.requests.labels(*labels, str(usage.status)).inc()
    m.latency.labels(*labels).observe(latency)
    if usage.error_code:
        m.errors.labels(*labels, usage.error_code).inc()
    if usage.first_chunk_s is not None:
        m.ttft.labels(*labels).observe(usage.first_chunk_s)
    m.tokens.labels(*labels, "prompt").inc(usage.prompt_tokens)
    m.tokens.labels(*labels, "completion").inc(usage.completion_tokens)
    # The rollout's analysis compares these, variant against variant. An engine outage hits every
    # variant alike and says nothing about the adapter; a 4xx is the client's; a 5xx (e.g. a failed
    # load) counts.
    answered = usage.status == 200
    text = "".join(usage.text) if usage.text is not None else None
    confidence, least = summarize(usage.logprobs) if answered else (None, None)
    if confidence is not None:
        m.confidence.labels(*labels).observe(confidence)
    ticket = (
        gateway.drift.wants_sample(route.deployment_id)
        if route.sample_inputs and usage.status < 500
        else None
    )
    capture = (
        (tenant.id, now)
        if answered and text is not None and gateway.capture.wants(route, now)
        else None
    )
    measured = route.sample is not None and usage.error_code != "engine_unavailable"
    checkable = answered and text is not None and route.answer_format is not None
    valid, captured = None, False
    # only then is there thread work
    if ticket is not None or capture is not None or (measured and checkable):
        valid, captured = await run_in_threadpool(
            _inspect,
            route,
            messages,
            text,
            answered,
            checkable,
            ticket,
            capture,
            gateway,
            usage,
            confidence,
        )
        if captured:
            m.captures.labels(tenant.name, route.deployment).inc()
    if measured:
        gateway.controller.samples.add(
            {
                **(route.sample or {}),
                "ok": usage.status < 500,
                "latency_s": latency,
                "output_tokens": usage.completion_tokens,
                "format_valid": valid,
                "confidence": confidence,
                "at": now,
            }
        )
    gateway.requests.add(
        _log_row(tenant, route.request_id, now, usage, latency)
        | {
            "deployment_id": route.deployment_id or None,
            "deployment": route.deployment,
            "rollout_id": route.sample["rollout_id"] if route.sample else None,
            "variant": route.variant,
            "digest": route.digest,
            "confidence_mean": confidence,
            "confidence_min": least,
            "captured": captured,
        }
    )


def _log_row(
    tenant: TenantEntry, request_id: str, now: float, usage: Usage, latency: float
) -> dict:
    """A request-log row; one that never reached a deployment (a bad body, an unknown model) has
    no route."""
    return {
        "request_id": request_id,
        "tenant_id": tenant.id,
        "key_id": tenant.key_id or None,
        "at": now,
        "deployment_id": None,
        "deployment": "",
        "rollout_id": None,
        "variant": "",
        "digest": "",
        "status": usage.status,
        "error_code": usage.error_code,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "latency_s": latency,
        "stream": usage.stream,
        "confidence_mean": None,
        "confidence_min": None,
        "captured": False,
    }


async def _admit(gateway: Gateway, tenant: TenantEntry) -> Admitted:
    """The tenant's rate and concurrency limits, before anything of the request is read."""
    try:
        return await gateway.limiter.admit(
            tenant.name, tenant.limits or Limits.defaults(gateway.settings)
        )
    except RateLimited as exc:
        gateway.metrics.rate_limited.labels(tenant.name, str(exc.code)).inc()
        raise


async def _resolve(
    gateway: Gateway, request: Request, tenant: TenantEntry, limits: Limits, request_id: str
) -> tuple[dict[str, Any], Route]:
    """The checked body (its images admitted) and where it goes."""
    body = await read_chat_body(request)
    await admit_images(
        body,
        ImageLimits(limits.images_per_request, limits.image_bytes, limits.image_pixels),
        gateway.remote_images,
    )
    _, deployment = await gateway.routes.fetch(request.state.api_key, body["model"])
    return body, _route(tenant, deployment, body, request.headers, request_id)


async def chat_completions(request: Request) -> Response:
    # The hot path: the catalog is read through the route cache, only a miss costs a thread
    # hand-off; a plain Starlette route (see below), since FastAPI's per-request dependency
    # resolution cost more than its work. The `Authenticate` middleware has checked the key already
    # (request.state.tenant).
    t0 = time.perf_counter()
    gateway: Gateway = request.app.state.gateway
    tenant: TenantEntry = request.state.tenant
    admitted = await _admit(gateway, tenant)
    request_id = new_request_id()
    headers = {**admitted.headers, "x-request-id": request_id}
    try:
        body, route = await _resolve(gateway, request, tenant, admitted.limits, request_id)
        # may wait for an engine slot: fairly between tenants
        await gateway.fair_queue.acquire(tenant.name)
    except BaseException as exc:
        await gateway.limiter.release(admitted, 0)
        usage = Usage()
        usage.status, usage.error_code = _outcome(exc)
        gateway.requests.add(
            _log_row(tenant, request_id, time.time(), usage, time.perf_counter() - t0)
        )
        _add_headers(exc, headers)
        raise
    usage = Usage(
        text=[]
        if route.answer_format is not None or route.sample_inputs or route.capture
        else None,
        logprobs=[] if gateway.settings.record_confidence else None,
        stream=bool(body.get("stream")),
    )
    messages = body.get("messages") or []
    try:
        response = await _forward(gateway.fleet, body, route, usage)
    except BaseException as exc:
        usage.status, usage.error_code = _outcome(exc)
        await _record(gateway, tenant, route, usage, t0, messages, admitted)
        _add_headers(exc, headers)
        raise
    response.headers.update(admitted.headers)
    response.background = BackgroundTask(
        _record, gateway, tenant, route, usage, t0, messages, admitted
    )
    return response


async def _forward(fleet: Fleet, body: dict[str, Any], route: Route, usage: Usage) -> Response:
    """Place the request on a replica, register its adapter there, forward it. A replica that
    does not answer (it died, or is gone) leaves placement, and the request goes once more to
    another one: nothing of it has reached the client yet (a stream that already started ends
    with an in-band error instead, in `forward_chat`)."""
    tried: list[str] = []
    while True:
        # in flight there until `_record`
        usage.replica = replica = fleet.place(route.digest, exclude=tried)
        try:
            await replica.client.ensure_loaded(route.digest)
            return await forward_chat(replica.client, body, route, usage)
        except EngineUnavailable:
            fleet.done(replica)
            usage.replica = None
            fleet.lost(replica)
            tried.append(replica.name)
            if len(tried) > 1 or not fleet.fail_over(tried):
                raise


def _outcome(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, LorafleetError):
        return exc.status, str(exc.code)
    return (
        (499, "client_closed")
        if isinstance(exc, asyncio.CancelledError)
        else (500, "internal_error")
    )


def _add_headers(exc: BaseException, headers: dict[str, str]) -> None:
    """Errors after admission carry the rate-limit headers too (every response does)."""
    if isinstance(exc, LorafleetError) and headers:
        exc.headers = {**headers, **(exc.headers or {})}


router.add_route(f"{router.prefix}/chat/completions", chat_completions, methods=["POST"])
