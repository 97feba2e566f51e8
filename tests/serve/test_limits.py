"""Tenant limits in one process: rates and concurrency (the `limits` library's counters in
memory), the headers every response carries, and the fair queue in front of the engine."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from lorafleet.errors import RateLimited, ServiceUnavailable
from lorafleet.serve import admission
from lorafleet.serve.admission import FairQueue
from lorafleet.serve.limits import Limits, TenantLimiter, reset_text
from lorafleet.serve.settings import Settings

UNLIMITED = Limits(
    rpm=0,
    tpm=0,
    concurrency=0,
    images_per_request=0,
    image_bytes=0,
    image_pixels=0,
    adapters=0,
    adapter_bytes=0,
    files=0,
    batches=0,
    batch_lines=0,
)


def test_defaults_come_from_settings_and_tenant_values_override_them():
    limits = Limits.defaults(Settings(tenant_rpm=7, tenant_concurrency=3))
    assert (limits.rpm, limits.concurrency) == (7, 3)
    mine = limits.overridden({"rpm": 100, "tpm": 0, "from_a_newer_release": 5})
    assert (mine.rpm, mine.tpm, mine.concurrency) == (100, 0, 3)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.02, "20ms"), (6.0, "6s"), (6.2, "7s"), (90, "1m30s"), (-1, "0ms")]
)
def test_reset_durations_read_as_openai_writes_them(seconds, text):
    assert reset_text(seconds) == text


async def test_requests_over_the_minute_are_refused_with_headers_that_say_when():
    limiter = TenantLimiter("memory://")
    limits = replace(UNLIMITED, rpm=3)
    seen = [(await limiter.admit("acme", limits)).headers for _ in range(3)]
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == ["2", "1", "0"]
    assert all(h["x-ratelimit-limit-requests"] == "3" for h in seen)
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", limits)
    error = refused.value
    assert (error.status, error.code) == (429, "requests_per_minute_exceeded")
    assert (
        1 <= int(error.headers["Retry-After"]) <= 60
        and error.headers["x-ratelimit-remaining-requests"] == "0"
    )
    # per tenant
    assert (await limiter.admit("globex", limits)).headers["x-ratelimit-remaining-requests"] == "2"


async def test_tokens_are_counted_when_a_request_ends_and_then_refuse_the_next():
    limiter = TenantLimiter("memory://")
    limits = replace(UNLIMITED, tpm=100)
    first = await limiter.admit("acme", limits)
    assert first.headers["x-ratelimit-remaining-tokens"] == "100"
    await limiter.release(first, 60)
    second = await limiter.admit("acme", limits)
    assert second.headers["x-ratelimit-remaining-tokens"] == "40"
    await limiter.release(second, 500)  # more than is left: the minute is spent
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", limits)
    assert refused.value.code == "tokens_per_minute_exceeded"
    assert refused.value.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_concurrency_is_held_until_release():
    limiter = TenantLimiter("memory://")
    limits = replace(UNLIMITED, concurrency=2)
    held = [await limiter.admit("acme", limits) for _ in range(2)]
    with pytest.raises(RateLimited) as refused:
        await limiter.admit("acme", limits)
    assert (
        refused.value.code == "concurrency_exceeded" and refused.value.headers["Retry-After"] == "1"
    )
    await limiter.release(held[0], 0)
    await limiter.release(held[0], 0)  # a second release of one request frees nothing more
    again = await limiter.admit("acme", limits)
    with pytest.raises(RateLimited):
        await limiter.admit("acme", limits)
    await limiter.release(again, 0)


def test_an_unknown_counter_store_is_refused_clearly():
    with pytest.raises(ValueError, match="LORAFLEET_LIMITS_URL"):
        TenantLimiter("postgres://x")


async def _until(condition, turns: int = 1000) -> None:
    """Let the event loop run until `condition()` holds (the woken tasks resume a few loop turns
    later)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_a_freed_slot_goes_to_the_tenant_with_the_fewest_in_the_engine():
    queue = FairQueue(lambda: 2, timeout_s=5)
    await queue.acquire("flood")
    await queue.acquire("flood")
    order: list[str] = []

    async def wait(tenant: str) -> None:
        await queue.acquire(tenant)
        order.append(tenant)

    waiting = [asyncio.create_task(wait("flood")) for _ in range(3)]
    await asyncio.sleep(0)
    quiet = asyncio.create_task(wait("quiet"))  # arrives last
    await asyncio.sleep(0)
    assert queue.waiting == 4 and queue.in_engine == 2
    queue.release("flood")
    await _until(lambda: order)
    assert order == ["quiet"]  # ahead of the three that waited longer: it had nothing in the engine
    for n in range(3):
        queue.release("flood")
        await _until(lambda n=n: len(order) == n + 2)
    assert order == ["quiet", "flood", "flood", "flood"]
    await asyncio.gather(*waiting, quiet)


async def test_a_request_that_waits_too_long_gets_503_and_leaves_the_queue():
    queue = FairQueue(lambda: 1, timeout_s=0.05)
    await queue.acquire("a")
    with pytest.raises(ServiceUnavailable) as busy:
        await queue.acquire("b")
    assert busy.value.code == "engine_busy"
    assert queue.waiting == 0
    queue.release("a")
    await queue.acquire("b")  # the slot is free again
    assert queue.running == {"b": 1}


async def test_a_client_that_leaves_while_waiting_takes_no_slot():
    queue = FairQueue(lambda: 1, timeout_s=5)
    await queue.acquire("a")
    leaving = asyncio.create_task(queue.acquire("b"))
    await asyncio.sleep(0)
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    queue.release("a")
    assert queue.in_engine == 0 and queue.waiting == 0


async def test_batch_lines_take_only_what_live_requests_leave(monkeypatch):
    queue = FairQueue(lambda: 4, timeout_s=5, background_share=0.5)
    started: list[str] = []

    async def line(name: str) -> None:
        await queue.acquire_background("t")
        started.append(name)

    # no live request in the engine: batch lines may take every slot
    lines = [asyncio.create_task(line(f"b{i}")) for i in range(6)]
    await _until(lambda: len(started) == 4)
    assert queue.in_engine == 4 and queue.waiting_background == 2
    # a live request waits for the next free slot, ahead of the batch lines waiting longer
    live = asyncio.create_task(queue.acquire("u"))
    await asyncio.sleep(0)
    queue.release_background("t")
    await _until(live.done)
    assert len(started) == 4 and queue.running == {"u": 1}
    # while a live request runs, batch lines hold at most half the slots (2): of two freed
    # slots, one goes to a waiting line, the other stays free
    queue.release_background("t")
    queue.release_background("t")
    await _until(lambda: len(started) == 5)
    assert queue.background == {"t": 2} and queue.in_engine == 3
    assert queue.waiting_background == 1
    queue.release("u")  # the last live request left, but live traffic may come back at once
    await asyncio.sleep(0)
    assert len(started) == 5
    monkeypatch.setattr(admission, "LIVE_IDLE_S", 0.0)  # ... once it has been idle that long
    queue.release_background("t")
    await _until(lambda: len(started) == 6)
    assert queue.background == {"t": 2}
    await asyncio.gather(*lines)


async def test_a_batch_line_cancelled_while_waiting_takes_no_slot():
    queue = FairQueue(lambda: 1, timeout_s=5)
    await queue.acquire("a")
    waiting = asyncio.create_task(queue.acquire_background("t"))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    queue.release("a")
    assert queue.in_engine == 0 and queue.waiting_background == 0
