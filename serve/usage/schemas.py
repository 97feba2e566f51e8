"""API schemas of usage, prices and budgets, built by this package and returned by the routes in
`lorafleet.serve.api`."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lorafleet.serve.types import UtcDateTime
from lorafleet.serve.usage.periods import Period

__all__ = [
    "UsageRow",
    "UsageTotal",
    "UsageReport",
    "PricesPublic",
    "PricesPut",
    "BudgetPut",
    "BudgetPublic",
    "TenantBudgets",
    "TenantPrices",
]

Price = Annotated[float, Field(ge=0, le=1e9)]


class UsageTotal(BaseModel):
    """What requests used: answered requests' tokens, images, engine time and cost; failed
    requests (any answer but a 200) only counted."""

    requests: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int
    images: int
    engine_seconds: float  # the engine's prefill + decode time, as it reported it
    cost: float  # in `currency`, at the prices in effect when each request ended


class UsageRow(UsageTotal):
    """One group of the report: the dimensions it was grouped by (the others null), and always
    the kind of requests, live or a batch's lines."""

    tenant: str | None = None
    day: date | None = None
    deployment: str | None = None  # "": requests that reached no deployment (a bad body)
    adapter: str | None = None  # name@version; "": no longer stored
    digest: str | None = None
    kind: Literal["live", "batch"]


class PricesPublic(BaseModel):
    prompt_per_million: float
    completion_per_million: float
    per_image: float
    per_engine_hour: float
    currency: str


class BudgetPublic(BaseModel):
    """A budget in its current period."""

    period: Period
    tokens: int | None  # the budget in tokens (prompt + completion), if any
    cost: float | None  # the budget in money, if any
    alert_at: float | None
    start: date  # the period's first day (UTC)
    resets_at: UtcDateTime
    spent_tokens: int
    spent_cost: float
    used: float  # the larger fraction spent of the two
    exceeded: bool


class UsageReport(BaseModel):
    """`GET /v1/usage`: usage from `start` to `end` (UTC days, both included)."""

    object: Literal["usage.report"] = "usage.report"
    tenant: str | None  # null: every tenant (the admin's report)
    start: date
    end: date
    group_by: list[str]
    currency: str
    rows: list[UsageRow]
    total: UsageTotal
    prices: PricesPublic | None = None  # the tenant's, now (one tenant's report)
    budgets: list[BudgetPublic] = []


class PricesPut(BaseModel):
    """Prices to set for one tenant or, given as null, to return to the default."""

    model_config = ConfigDict(extra="forbid")
    prompt_per_million: Price | None = None
    completion_per_million: Price | None = None
    per_image: Price | None = None
    per_engine_hour: Price | None = None


class TenantPrices(BaseModel):
    tenant: str
    prices: PricesPublic  # in effect
    overrides: dict[str, float]  # set for this tenant; the rest are the defaults
    defaults: PricesPublic


class BudgetPut(BaseModel):
    """A tenant's budget of one period: tokens, money or both (the first reached stops it)."""

    model_config = ConfigDict(extra="forbid")
    tokens: Annotated[int, Field(ge=1, le=2**62)] | None = None
    cost: Annotated[float, Field(gt=0, le=1e12)] | None = None
    alert_at: Annotated[float, Field(gt=0, le=1)] | None = None

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetPut:
        if self.tokens is None and self.cost is None:
            raise ValueError("give 'tokens', 'cost' or both")
        return self


class TenantBudgets(BaseModel):
    tenant: str
    currency: str
    budgets: list[BudgetPublic]
