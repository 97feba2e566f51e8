"""The hop to the engine: place the request on a replica, make sure its adapter is loaded there,
forward it, and relay the answer; once more on another replica if the first did not answer. In
front of an InferencePool the pool places it: the request goes there, once more if the pool
reached no pod.

The request is not re-modelled. Only `model` (rewritten to the adapter digest), `stream_options`
(usage is always requested, for metrics, and hidden again if the client did not ask) and `logprobs`
(the chosen tokens' log-probabilities are requested for the answer's confidence, and hidden again
if the client did not ask) are touched; vLLM validates everything else and its OpenAI-shaped errors
pass through with their status. The digest never reaches the client. The request's id goes to vLLM
as `X-Request-Id`, so the body's `id` is the gateway's.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from fastapi.responses import Response, StreamingResponse

from lorafleet.errors import EngineBusy, EngineUnavailable
from lorafleet.serve.engine.client import EngineClient, map_engine_errors
from lorafleet.serve.feedback.confidence import token_logprobs
from lorafleet.serve.feedback.request_log import REQUEST_ID_PREFIX
from lorafleet.serve.fleet.fleet import EngineReplica, Fleet
from lorafleet.serve.types import Route

__all__ = ["Usage", "Forwarded", "forward_with_failover", "forward_chat"]


@dataclass
class Usage:
    """What one forwarded request cost and got back; filled in while the response passes
    through (a stream's, until its last chunk)."""

    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_chunk_s: float | None = None
    error_code: str | None = None
    # the answer's text, collected only when something reads it (format check, drift, capture)
    text: list[str] | None = None
    # the answer's token log-probabilities, collected when confidence is recorded
    logprobs: list[float] | None = None
    hide_logprobs: bool = False  # the gateway asked for them, the client did not
    stream: bool = False
    # the engine's own prefill (scheduled to first token) and decode (first to last token)
    # times, where it reported them
    prefill_s: float | None = None
    decode_s: float | None = None


@dataclass(frozen=True)
class Forwarded:
    """The engine's response (its body may still be streaming) and the replica serving it, which
    holds the request until it is recorded."""

    response: Response
    replica: EngineReplica


async def forward_with_failover(fleet: Fleet, body: dict, route: Route, usage: Usage) -> Forwarded:
    """Place the request on a replica, make sure its adapter is loaded there, forward it. A
    replica that does not answer (it died, or is gone) leaves placement, and the request goes
    once more to another one: nothing of it has reached the client yet (a stream that already
    started ends with an in-band error instead, in `_relay`)."""
    tried: list[str] = []
    while True:
        replica = fleet.place(route.digest, exclude=tried)
        try:
            await replica.client.ensure_loaded(route.digest)
            return Forwarded(await forward_chat(replica.client, body, route, usage), replica)
        except EngineUnavailable:
            fleet.release(replica, route.digest)
            fleet.mark_unreachable(replica)
            tried.append(replica.name)
            if len(tried) > 1 or not fleet.fail_over(tried):
                raise
        except BaseException:
            fleet.release(replica, route.digest)
            raise


def _public(raw: bytes, route: Route) -> bytes:
    # Deployment names are [A-Za-z0-9._-]: safe to splice into JSON without escaping.
    return raw.replace(route.digest.encode(), route.deployment.encode())


def _read_usage(payload: dict, usage: Usage) -> bool:
    """Record the answer's token counts and the engine's times; whether the payload carried the
    times (vLLM's `metrics`, which the client is not sent)."""
    counts = payload.get("usage") or {}
    usage.prompt_tokens = counts.get("prompt_tokens", 0) or 0
    usage.completion_tokens = counts.get("completion_tokens", 0) or 0
    timings = payload.pop("metrics", None)
    if not isinstance(timings, dict):
        return timings is not None
    prefill_ms, decode_ms = timings.get("time_to_first_token_ms"), timings.get("generation_time_ms")
    if isinstance(prefill_ms, int | float):
        usage.prefill_s = prefill_ms / 1000
    if isinstance(decode_ms, int | float):
        usage.decode_s = decode_ms / 1000
    return True


def _error_code(raw: bytes) -> str:
    try:
        error = json.loads(raw).get("error", {})
        return str(error.get("code") or error.get("type") or "engine_error")
    except (ValueError, AttributeError):
        return "engine_error"


async def forward_chat(engine: EngineClient, body: dict, route: Route, usage: Usage) -> Response:
    """Send `body` to the engine as adapter `route.digest`; answer as `route.deployment`."""
    body = {**body, "model": route.digest}
    stream = bool(body.get("stream"))
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if stream:
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    # a client that set top_logprobs without logprobs gets vLLM's error, as it would without the
    # gateway
    if usage.logprobs is not None and not body.get("logprobs") and body.get("top_logprobs") is None:
        body["logprobs"], usage.hide_logprobs = True, True
    with map_engine_errors():
        response = await engine.post_chat(
            json.dumps(body).encode(),
            route.request_id.removeprefix(REQUEST_ID_PREFIX),
            engine.flow_headers(route.tenant, route.objective),
        )
    if engine.pool is not None:
        _check_pool_answer(response)
    usage.status = response.status
    if stream and response.status == 200:
        return StreamingResponse(
            _relay(response, route, usage, client_wants_usage),
            media_type="text/event-stream",
            headers=route.headers,
        )
    try:
        with map_engine_errors():
            content = _public(await response.read(), route)
    finally:
        response.release()
    if response.status != 200:
        content = engine.public_error(content, response.status)  # OpenAI's shape, no paths
        usage.error_code = _error_code(content)
        return Response(
            content,
            status_code=response.status,
            media_type="application/json",
            headers=route.headers,
        )
    payload = json.loads(content)
    changed = _read_usage(payload, usage)
    choices = payload.get("choices") or [{}]
    if usage.text is not None:
        usage.text.append((choices[0].get("message") or {}).get("content") or "")
    if usage.logprobs is not None:
        usage.logprobs.extend(token_logprobs(choices[0]))
        if usage.hide_logprobs:  # as vLLM answers without them
            for choice in choices:
                choice["logprobs"] = None
            changed = True
    # the engine's bytes, unless something of them is the gateway's only
    return Response(
        _dumps(payload) if changed else content,
        media_type="application/json",
        headers=route.headers,
    )


# a pool's gateway that could not reach a pod (none ready, one gone mid-request): nothing was
# generated, so the request may go once more
_POOL_UNREACHED = (502, 503, 504)


def _check_pool_answer(response: aiohttp.ClientResponse) -> None:
    """A pool that answers that it reached no pod, or that it sheds the request (429: its flow
    control under saturation), gets the gateway's own 503 + Retry-After, as an engine that does
    not answer does (the first, once more before that)."""
    if response.status in _POOL_UNREACHED:
        response.release()
        raise EngineUnavailable(f"the pool reached no engine ({response.status}); retry shortly")
    if response.status == 429:
        response.release()
        raise EngineBusy("the pool is saturated and shed the request; retry shortly")


def _dumps(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def _read_line(line: bytes, usage: Usage, client_wants_usage: bool) -> bytes:
    """One SSE line: usage and text recorded; the usage-only chunk dropped unless the client
    asked for it."""
    if line.startswith(b"data: {") and b'"choices":[]' in line and b'"usage":' in line:
        # the usage-only chunk that closes the stream (with the engine's times)
        chunk = json.loads(line[6:])
        if not client_wants_usage:
            _read_usage(chunk, usage)
            return b""
        if _read_usage(chunk, usage):
            return b"data: " + _dumps(chunk) + line[len(line.rstrip(b"\r\n")) :]
        return line
    if (usage.text is not None or usage.logprobs is not None) and line.startswith(b"data: {"):
        chunk = json.loads(line[6:])
        hidden = False
        for choice in chunk.get("choices") or []:
            if usage.text is not None:
                usage.text.append((choice.get("delta") or {}).get("content") or "")
            if usage.logprobs is not None and choice.get("logprobs") is not None:
                if choice.get("index", 0) == 0:
                    usage.logprobs.extend(token_logprobs(choice))
                if usage.hide_logprobs:
                    choice["logprobs"], hidden = None, True
        if hidden:
            return b"data: " + _dumps(chunk) + line[len(line.rstrip(b"\r\n")) :]
    return line


async def _relay(
    response: aiohttp.ClientResponse, route: Route, usage: Usage, client_wants_usage: bool
) -> AsyncIterator[bytes]:
    """The engine's bytes as they come, whole lines only; lines are looked at one by one only
    where something reads them (the answer's text, the usage chunk), so most chunks pass through
    untouched."""
    t0 = time.perf_counter()
    pending = b""
    try:
        async for chunk in response.content.iter_any():
            if usage.first_chunk_s is None:
                usage.first_chunk_s = time.perf_counter() - t0
            data = pending + chunk
            cut = data.rfind(b"\n") + 1
            lines, pending = data[:cut], data[cut:]
            if usage.text is not None or usage.logprobs is not None or b'"usage":' in lines:
                lines = b"".join(
                    _read_line(line, usage, client_wants_usage)
                    for line in lines.splitlines(keepends=True)
                )
            if lines:
                yield _public(lines, route)
        if pending:
            yield _public(pending, route)
    # the engine died mid-stream: tell the client in-band
    except (aiohttp.ClientError, TimeoutError) as exc:
        usage.status, usage.error_code = 503, "engine_unavailable"
        error = {
            "error": {
                "message": f"the engine stopped mid-stream ({type(exc).__name__}); retry",
                "type": "server_error",
                "code": "engine_unavailable",
            }
        }
        yield f"data: {json.dumps(error)}\n\n".encode()
    finally:
        response.release()
