"""`POST /v1/chat/completions`, the hot path, read as its steps.

    admit        the tenant's rate and concurrency limits, before anything of the body is read
    read_body    the JSON body, checked where the gateway reads it, its images admitted
    resolve      the deployment the body names, from the route cache (a miss reads the catalog)
    assign       the variant that serves the request: stable, or its sticky bucket's in a rollout
    constrain    the deployment's enforced answer format, as the engine's structured-output
                 constraint (`answer_format.enforce_format`), unless the client sent its own
    wait_for_slot  the fair queue: engine slots shared max-min fairly between tenants
    forward      place on a replica, ensure the adapter is loaded, forward, relay
                 (`forward.forward_with_failover`: once more elsewhere if a replica did not answer)
    record       release, metrics, samples, the request log (`chat_record.ChatRecord`)

Each step hands one value to the next; the bookkeeping of every outcome is the `ChatRecord`
context manager's. Authentication came before all of this: the guard middleware checked the key
from the headers alone and put the tenant's snapshot in `request.state`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lorafleet.errors import InvalidRequest, LorafleetError, RateLimited, ServiceUnavailable
from lorafleet.serve.answer_format import enforce_format
from lorafleet.serve.api.chat_record import ChatRecord
from lorafleet.serve.api.forward import forward_with_failover
from lorafleet.serve.gateway import Gateway
from lorafleet.serve.images import ImageLimits, admit_images
from lorafleet.serve.limits import Admitted, Limits
from lorafleet.serve.rollouts.routing import bucket_of, choose, unit_of
from lorafleet.serve.route_cache import DeploymentEntry, TenantEntry
from lorafleet.serve.types import RolloutAssignment, Route

__all__ = [
    "router",
    "chat_completions",
    "serve_chat",
    "serve_line",
    "Answered",
    "read_chat_body",
    "parse_json_body",
    "require_model",
]

router = APIRouter(prefix="/v1")


async def chat_completions(request: Request) -> Response:
    """A plain Starlette route (see the bottom of this module): FastAPI's per-request dependency
    resolution cost more than the gateway's own work."""
    return await serve_chat(request, read_chat_body)


async def serve_chat(
    request: Request, read: Callable[[Request], Awaitable[dict[str, Any]]]
) -> Response:
    """The chat path for the chat completion body `read` makes of the request (the Responses
    API's route reads its own body into one)."""
    gateway: Gateway = request.app.state.gateway
    tenant: TenantEntry = request.state.tenant
    admitted = await admit(gateway, tenant)
    async with ChatRecord(gateway, tenant, admitted) as record:
        body, record.images = await read_body(request, admitted.limits, gateway, read)
        deployment = await resolve(gateway, request.state.api_key, body["model"])
        route = assign(tenant, deployment, body, request.headers, record.request_id)
        body = enforce_format(body, route.answer_format)
        await wait_for_slot(gateway, tenant)
        usage = record.forwarding(route, body, gateway.settings.record_confidence)
        forwarded = await forward_with_failover(gateway.fleet, body, route, usage)
        return record.respond(forwarded)


@dataclass(frozen=True)
class Answered:
    """What the chat path answered a batch's line: the status, the body (a chat completion, or
    OpenAI's error object), and the request's id."""

    status: int
    body: dict[str, Any]
    request_id: str


async def serve_line(
    gateway: Gateway, tenant: TenantEntry, body: dict[str, Any], batch_id: str
) -> Answered:
    """A batch's line through the chat path's steps, as a background request of the fair queue:
    no stream, no rate limit (the batch's own limits apply), the batch as the unit of a rollout's
    assignment unless the line names a `user`. An error is answered, as a live request's would
    be; an engine that is down raises ServiceUnavailable (the line waits for it)."""
    limits = tenant.limits or Limits.defaults(gateway.settings)
    admitted = Admitted(tenant.name, dataclasses.replace(limits, rpm=0, tpm=0), {})
    record = ChatRecord(gateway, tenant, admitted, batch_id)
    try:
        async with record:
            # a batch's lines stop with their tenant's budget too
            await gateway.budgets.check(tenant.id, tenant.name, tenant.budgets)
            require_model(body)
            if not isinstance(body.get("messages"), list):
                raise InvalidRequest("'messages' must be a list")
            body = {**body, "stream": False}
            images = ImageLimits(limits.images_per_request, limits.image_bytes, limits.image_pixels)
            record.images = await admit_images(body, images, gateway.remote_images)
            deployment = await gateway.route_cache.deployment_of(tenant.id, body["model"])
            session = {"x-lorafleet-session": batch_id}
            route = assign(tenant, deployment, body, session, record.request_id)
            body = enforce_format(body, route.answer_format)
            await gateway.fair_queue.acquire_background(tenant.name)
            usage = record.forwarding(route, body, gateway.settings.record_confidence)
            forwarded = await forward_with_failover(gateway.fleet, body, route, usage)
            response = record.respond(forwarded)
    except ServiceUnavailable:
        raise
    except LorafleetError as exc:
        error = {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}
        return Answered(exc.status, {"error": error}, record.request_id)
    assert response.background is not None  # the record's settling: no server sends it here
    await response.background()
    return Answered(response.status_code, json.loads(bytes(response.body)), record.request_id)


async def admit(gateway: Gateway, tenant: TenantEntry) -> Admitted:
    """The tenant's budgets, then its rate and concurrency limits, before anything of the request
    is read."""
    await gateway.budgets.check(tenant.id, tenant.name, tenant.budgets)
    try:
        return await gateway.limiter.admit(
            tenant.name, tenant.limits or Limits.defaults(gateway.settings)
        )
    except RateLimited as exc:
        gateway.metrics.rate_limited.labels(tenant.name, str(exc.code)).inc()
        raise


async def read_body(
    request: Request,
    limits: Limits,
    gateway: Gateway,
    read: Callable[[Request], Awaitable[dict[str, Any]]],
) -> tuple[dict[str, Any], int]:
    """The checked body, its images admitted under the tenant's limits (remote ones fetched and
    inlined, where allowed), and how many images it has."""
    body = await read(request)
    images = ImageLimits(limits.images_per_request, limits.image_bytes, limits.image_pixels)
    return body, await admit_images(body, images, gateway.remote_images)


async def resolve(gateway: Gateway, api_key: str, model: str) -> DeploymentEntry:
    """The tenant's deployment named `model` (NotFound for any other name)."""
    _, deployment = await gateway.route_cache.fetch(api_key, model)
    return deployment


def assign(
    tenant: TenantEntry,
    deployment: DeploymentEntry,
    body: dict,
    headers: Mapping[str, str],
    request_id: str,
) -> Route:
    """Which adapter serves this request of the deployment: the stable one, or the variant the
    request's unit (user, session or request) is assigned to while a rollout runs."""
    route = Route(
        request_id=request_id,
        deployment=deployment.name,
        digest=deployment.stable_digest,
        deployment_id=deployment.id,
        answer_format=deployment.answer_format,
        sample_inputs=tenant.sample_inputs and deployment.validation_set_id is not None,
        capture=deployment.capture,
        tenant=tenant.name,
        objective=deployment.objective,
    )
    if (rollout := deployment.rollout) is None:
        return route
    unit = unit_of(body, headers)
    bucket = bucket_of(rollout.salt, tenant.name, deployment.name, unit)
    chosen = choose(rollout.variants, bucket)
    unit_hash = hashlib.sha256(unit.encode()).hexdigest()[:16]
    assignment = RolloutAssignment(rollout.id, rollout.step_index, chosen.label, unit_hash)
    return dataclasses.replace(
        route, digest=chosen.digest, variant=chosen.label, assignment=assignment
    )


async def wait_for_slot(gateway: Gateway, tenant: TenantEntry) -> None:
    """An engine slot for the request, fairly between tenants (EngineBusy past the queue's
    timeout)."""
    await gateway.fair_queue.acquire(tenant.name)


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
    body = await parse_json_body(request)
    require_model(body)
    if not isinstance(body.get("messages"), list):
        raise InvalidRequest("'messages' must be a list")
    return body


def require_model(body: dict[str, Any]) -> None:
    """The body names a deployment in `model` (InvalidRequest `model_required` if not)."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidRequest(
            "'model' is required: the name of one of your deployments", code="model_required"
        )


async def parse_json_body(request: Request) -> dict[str, Any]:
    """The request's body: a JSON object, nested no deeper than `MAX_JSON_DEPTH`."""
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
    return body


router.add_route(f"{router.prefix}/chat/completions", chat_completions, methods=["POST"])
