"""Per-tenant limits: what they are (`Limits`: the settings' defaults, overridden per tenant by the
admin) and how the chat path enforces the rates and the concurrency (`TenantLimiter`).

Requests and tokens per minute are counted with the `limits` library's sliding-window counter (the
weighted sum of the current and the previous minute, as Cloudflare and NGINX count; well tested and
kept, with the same algorithm in memory and in Redis), so this module holds no rate arithmetic.
Counters live in this process by default (`LORAFLEET_LIMITS_URL=memory://`: one gateway) or in Redis
(`redis://host:6379/0`), where every gateway process counts together. Tokens are known only when the
answer is complete: a request is admitted while the minute's token budget is not spent, and its
prompt + completion tokens are counted when it ends.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from lorafleet.errors import RateLimited
from lorafleet.serve.settings import Settings

__all__ = [
    "Limits",
    "LIMIT_NAMES",
    "Admitted",
    "TenantLimiter",
    "reset_text",
]


@dataclass(frozen=True)
class Limits:
    """A tenant's effective limits; 0 means unlimited."""

    rpm: int  # chat requests per minute
    tpm: int  # prompt + completion tokens per minute, as the engine counts them
    concurrency: int  # chat requests in flight at once
    images_per_request: int
    image_bytes: int  # per image, decoded
    image_pixels: int  # per image, width x height
    adapters: int  # adapter versions stored
    adapter_bytes: int  # their total size
    files: int  # files stored (batch inputs and outputs)
    batches: int  # batches not yet finished
    batch_lines: int  # request lines in one batch

    @classmethod
    def defaults(cls, settings: Settings) -> Limits:
        return cls(
            rpm=settings.tenant_rpm,
            tpm=settings.tenant_tpm,
            concurrency=settings.tenant_concurrency,
            images_per_request=settings.max_images_per_request,
            image_bytes=settings.max_image_bytes,
            image_pixels=settings.max_image_pixels,
            adapters=settings.tenant_max_adapters,
            adapter_bytes=settings.tenant_max_adapter_bytes,
            files=settings.tenant_max_files,
            batches=settings.tenant_max_batches,
            batch_lines=settings.tenant_max_batch_lines,
        )

    def overridden(self, overrides: dict[str, Any] | None) -> Limits:
        """These limits with the tenant's own values (unknown names, e.g. from a newer release,
        are ignored)."""
        known = {
            k: int(v) for k, v in (overrides or {}).items() if k in LIMIT_NAMES and v is not None
        }
        return replace(self, **known)


LIMIT_NAMES = tuple(f.name for f in fields(Limits))


def reset_text(seconds: float) -> str:
    """OpenAI's duration format for x-ratelimit-reset-*: "20ms", "6s", "1m30s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class Admitted:
    """A request let through: its tenant, the headers every response carries, and whether it
    holds a concurrency slot (released once, by `TenantLimiter.release`)."""

    tenant: str
    limits: Limits
    headers: dict[str, str]
    holds_slot: bool = False


class _Concurrency:
    """Requests in flight per tenant: in this process, or in Redis (shared by every gateway)."""

    _KEY_TTL_S = 3600  # a gateway killed mid-request leaves its counts behind for at most this long

    def __init__(self, url: str) -> None:
        self._local: dict[str, int] = {}
        self._redis = None
        if url.startswith(("redis://", "rediss://", "unix://")):
            import redis.asyncio

            self._redis = redis.asyncio.from_url(url)

    async def acquire(self, tenant: str, limit: int) -> bool:
        if self._redis is None:
            if self._local.get(tenant, 0) >= limit:
                return False
            self._local[tenant] = self._local.get(tenant, 0) + 1
            return True
        key = f"lorafleet:inflight:{tenant}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, self._KEY_TTL_S)
            count, _ = await pipe.execute()
        if count > limit:
            await self._redis.decr(key)
            return False
        return True

    async def release(self, tenant: str) -> None:
        if self._redis is None:
            self._local[tenant] -= 1
            if not self._local[tenant]:
                del self._local[tenant]
        else:
            await self._redis.decr(f"lorafleet:inflight:{tenant}")

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()


def _storage_url(url: str) -> tuple[str, dict[str, Any]]:
    if url.startswith(("redis://", "rediss://")):
        return "async+" + url, {"implementation": "redispy"}
    if url.startswith("memory://"):
        return "async+memory://", {}
    raise ValueError(f"LORAFLEET_LIMITS_URL must be memory:// or redis://host:port/db, not {url!r}")


class TenantLimiter:
    """Admits a tenant's chat request (rate and concurrency limits) and counts its tokens when it
    ends."""

    def __init__(self, url: str) -> None:
        storage_url, options = _storage_url(url)
        # the counters' storage, shared with the budgets' (`lorafleet.serve.usage.budgets`)
        self.storage = storage_from_string(storage_url, **options)
        self._limiter = SlidingWindowCounterRateLimiter(self.storage)
        self._concurrency = _Concurrency(url)

    async def admit(self, tenant: str, limits: Limits) -> Admitted:
        """Count one request; raise RateLimited (429, with the headers) when a limit is reached."""
        headers: dict[str, str] = {}
        if limits.tpm:
            tokens = RateLimitItemPerMinute(limits.tpm)
            reset, remaining = await self._limiter.get_window_stats(tokens, tenant)
            headers |= _trio("tokens", limits.tpm, remaining, reset)
            if remaining <= 0:
                raise RateLimited(
                    f"tenant {tenant!r} used its {limits.tpm} tokens per minute; retry in "
                    f"{headers['x-ratelimit-reset-tokens']}",
                    reset - time.time(),
                    headers,
                    "tokens_per_minute_exceeded",
                )
        if limits.rpm:
            requests = RateLimitItemPerMinute(limits.rpm)
            allowed = await self._limiter.hit(requests, tenant)
            reset, remaining = await self._limiter.get_window_stats(requests, tenant)
            headers |= _trio("requests", limits.rpm, remaining, reset)
            if not allowed:
                raise RateLimited(
                    f"tenant {tenant!r} sent its {limits.rpm} requests per minute; retry in "
                    f"{headers['x-ratelimit-reset-requests']}",
                    reset - time.time(),
                    headers,
                    "requests_per_minute_exceeded",
                )
        admitted = Admitted(tenant, limits, headers)
        if limits.concurrency:
            if not await self._concurrency.acquire(tenant, limits.concurrency):
                raise RateLimited(
                    f"tenant {tenant!r} has {limits.concurrency} requests in flight, its limit; "
                    "retry when one ends",
                    1.0,
                    headers,
                    "concurrency_exceeded",
                )
            admitted.holds_slot = True
        return admitted

    async def release(self, admitted: Admitted, tokens: int) -> None:
        """The request ended: free its concurrency slot and count its tokens."""
        if admitted.holds_slot:
            admitted.holds_slot = False
            await self._concurrency.release(admitted.tenant)
        if admitted.limits.tpm and tokens > 0:
            item = RateLimitItemPerMinute(admitted.limits.tpm)
            _, remaining = await self._limiter.get_window_stats(item, admitted.tenant)
            # an answer larger than what is left fills the minute (the library refuses overdraft)
            if remaining > 0:
                await self._limiter.hit(item, admitted.tenant, cost=min(tokens, remaining))

    async def aclose(self) -> None:
        await self._concurrency.aclose()


def _trio(kind: str, limit: int, remaining: int, reset_at: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, remaining)),
        f"x-ratelimit-reset-{kind}": reset_text(reset_at - time.time()),
    }
