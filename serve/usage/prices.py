"""What usage costs: the prices (`Prices`: the settings' defaults, overridden per tenant by the
admin) and the one function that turns a request's usage into money (`Prices.cost_nanos`).

Cost is kept in billionths of the currency unit (integers): sums over millions of requests stay
exact, in the catalog and in the budget counters alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from lorafleet.serve.settings import Settings

__all__ = ["Prices", "PRICE_NAMES", "NANOS", "money"]

NANOS = 1_000_000_000  # billionths of the currency unit in one unit


@dataclass(frozen=True)
class Prices:
    """A tenant's effective prices, in the settings' currency; 0 means free."""

    prompt_per_million: float  # per million prompt tokens
    completion_per_million: float  # per million completion tokens
    per_image: float
    per_engine_hour: float  # per hour of the engine's prefill and decode time

    @classmethod
    def defaults(cls, settings: Settings) -> Prices:
        return cls(
            prompt_per_million=settings.price_prompt_per_million,
            completion_per_million=settings.price_completion_per_million,
            per_image=settings.price_per_image,
            per_engine_hour=settings.price_per_engine_hour,
        )

    def overridden(self, overrides: dict[str, Any] | None) -> Prices:
        """These prices with the tenant's own (unknown names, e.g. from a newer release, are
        ignored)."""
        known = {
            k: float(v) for k, v in (overrides or {}).items() if k in PRICE_NAMES and v is not None
        }
        return replace(self, **known)

    def cost_nanos(
        self, prompt_tokens: int, completion_tokens: int, images: int, engine_s: float
    ) -> int:
        """What one answered request costs, in billionths of the currency unit."""
        return round(
            NANOS
            * (
                prompt_tokens * self.prompt_per_million / 1e6
                + completion_tokens * self.completion_per_million / 1e6
                + images * self.per_image
                + engine_s * self.per_engine_hour / 3600
            )
        )


PRICE_NAMES = tuple(f.name for f in fields(Prices))


def money(nanos: int) -> float:
    """Billionths of the currency unit as the unit (what reports show)."""
    return nanos / NANOS
